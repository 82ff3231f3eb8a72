"""The code base's static checks, run with the suite: ruff's lint rules ([tool.ruff.lint]) over the package, the tests
and the benchmarks, and mypy's type check ([tool.mypy]) of the package. A failure shows the tool's report."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The tools of the environment that runs the tests (`pip install -e '.[test]'`), not whichever is first on PATH.
TOOLS = Path(sys.executable).parent
# A report longer than this is cut (from its start: the summary line comes last).
REPORT_CHARS = 20_000


def installed(name: str) -> Path:
    found = shutil.which(name, path=str(TOOLS))
    if found is None:
        pytest.skip(f"{name} is not installed in {TOOLS} (pip install -e '.[test]')")
    return Path(found)


def run_check(args: list[str], timeout_s: int) -> tuple[int, str]:
    """Exit code and report (stdout, then stderr) of a check run from the repository root."""
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
    report = r.stdout + r.stderr
    return r.returncode, report[-REPORT_CHARS:]


def test_ruff_finds_no_lint_errors():
    code, report = run_check([str(installed("ruff")), "check", "clipforge", "tests", "benchmarks"], timeout_s=120)
    assert code == 0, f"ruff check failed:\n{report}"


# Up to ~75 s with an empty cache (.mypy_cache): most of it reads torch's, numpy's and Ray's own annotations.
@pytest.mark.slow
def test_mypy_finds_no_type_errors():
    # The files to check are the config's (`files` in [tool.mypy]).
    code, report = run_check([str(installed("mypy"))], timeout_s=600)
    assert code == 0, f"mypy failed:\n{report}"


SLOPPY = '''\
from typing import Optional


def first_word(text: Optional[str]) -> str:
    try:
        return text.split()[0]
    except Exception:
        return ""  # type: ignore
'''


def test_the_configured_checks_catch_sloppy_code(tmp_path):
    sloppy = tmp_path / "sloppy.py"
    sloppy.write_text(SLOPPY)
    config = str(REPO / "pyproject.toml")
    code, report = run_check([str(installed("ruff")), "check", "--no-cache", "--config", config, str(sloppy)],
                             timeout_s=120)
    assert code == 1, report
    assert "BLE001" in report and "PGH003" in report  # a blind except; an ignore that does not say what it ignores
    code, report = run_check([str(installed("mypy")), "--config-file", config, "--no-incremental", str(sloppy)],
                             timeout_s=120)
    assert code == 1, report
    assert '[union-attr]' in report and "[unused-ignore]" in report  # text may be None; nothing to ignore there
