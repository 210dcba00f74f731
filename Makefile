# Two commands that work on a fresh machine with Python 3 and make:
#   make demo   -- 2-D end-to-end pi-Flow demo (exact teacher + learned teacher), prints a table
#   make test   -- the test suite without the tests marked slow (~2-3 min on 2 cores); make test-slow runs those
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU PyTorch pinned for this repository's CI; GPU users: install your CUDA build of torch first,
# then `pip install -e .` (the package itself accepts torch>=2.3).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow bench venv clean ui screenshot

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,ui]"
	$(PY) -m pip install --quiet --no-deps "torch-fidelity==0.3.0"   # ADM evaluation tests (its torchvision is not needed)
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/piflow demo

# the fast tier runs its test files in TEST_WORKERS processes (pytest-xdist); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

ui: $(VENV)/.installed
	$(VENV)/bin/piflow ui

# the README's screenshot, taken by the browser test's own helpers (needs chromium + chromium-driver)
screenshot: $(VENV)/.installed
	$(PY) tests/ui/browser.py docs/images/ui_playground.png

bench: $(VENV)/.installed
	$(PY) benchmarks/policy_overhead.py

clean:
	rm -rf $(VENV) runs
