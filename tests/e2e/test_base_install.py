"""`pip install clipforge` without extras is the model library: its dependencies resolve without Ray, object-store
clients, onnxruntime or DeepSpeed, and clipforge.models builds a model and computes the contrastive loss in a process
where none of those can be imported."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What only the extras bring: jobs on Ray and object stores ([cluster]), export ([export]), DeepSpeed.
# (PyYAML is not among them: the base's own dependencies bring it, through timm and huggingface_hub.)
EXTRAS_ONLY = ("ray", "s3fs", "pyarrow", "pandas", "webdataset", "onnx", "onnxruntime", "deepspeed", "tensorboard",
               "img2dataset", "moto")

MODEL_LIBRARY_USE = r"""
import importlib.util, torch
from clipforge.models import ModelSpec, create_loss, create_model
from clipforge.models.spec import LossSpec

assert importlib.util.find_spec("ray") is None and importlib.util.find_spec("onnxruntime") is None
bundle = create_model(ModelSpec(name="tiny", trainable="all"))
size = bundle.model.visual.image_size
images = torch.rand(4, 3, *(size if isinstance(size, tuple) else (size, size)))
texts = bundle.tokenizer(["a red square", "a blue circle", "a green line", "a dog"])
image_features, text_features, logit_scale = bundle.model(images, texts)[:3]
loss = create_loss(LossSpec(kind="clip"))(image_features, text_features, logit_scale)
loss.backward()
assert torch.isfinite(loss) and loss.item() > 0
print("loss", float(loss))
"""


def site_without(folder: Path, left_out: set[str]) -> Path:
    """A folder of links to this environment's installed packages, but those in `left_out` (and their metadata):
    Python started without its site packages and with this folder on its path sees an install that lacks them."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in left_out or entry.suffix == ".pth" or top.startswith("__editable__"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.slow
def test_base_dependencies_leave_out_every_extra(tmp_path):
    """pip resolves the project without extras, from scratch (nothing installed counts), and installs none of them."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(tmp_path / "report.json"), str(REPO)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if r.returncode != 0 and "No matching distribution" in r.stderr:
        pytest.skip("the package index cannot resolve the base dependencies here")
    assert r.returncode == 0, r.stderr[-3000:]
    names = {item["metadata"]["name"].lower().replace("_", "-")
             for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"torch", "open-clip-torch", "tokenizers", "pydantic"} <= names
    assert names.isdisjoint(EXTRAS_ONLY), sorted(names & set(EXTRAS_ONLY))


def test_model_library_works_where_no_extra_is_installed(tmp_path):
    site = site_without(tmp_path / "site", {name.replace("-", "_") for name in EXTRAS_ONLY} | set(EXTRAS_ONLY))
    # After the standard library, as site packages are (PYTHONPATH would put them first).
    code = f"import sys; sys.path += [{str(site)!r}, {str(REPO)!r}]\n" + MODEL_LIBRARY_USE
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("loss ")
