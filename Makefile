# `make demo`: create .venv, install, run build -> train -> eval on real offline data (writes runs/demo/report.json).
# `make test`: create .venv if missing, run the whole test suite: tests/unit, tests/integration (real Ray, S3 on
# loopback, headless Chromium) and tests/e2e (whole jobs, submission, install), ~25 min on 2 cores.
# `make test-fast`: the unit tests only (no Ray, no servers but loopback HTTP), under 3 minutes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch build is pinned first so that no other package pulls a different (multi-GB) build.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv browser demo demo-tiny test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_PKGS)
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

demo: venv
	$(PY) -m clipforge demo --out runs/demo

demo-tiny: venv
	$(PY) -m clipforge demo --tiny --out runs/demo-tiny

# Headless Chromium + chromedriver for the dashboard's browser tests (Debian packages; skipped when not root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)) || \
	    echo "note: chromium not installed; browser tests will be skipped"; }

test: venv browser
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf runs build dist *.egg-info
