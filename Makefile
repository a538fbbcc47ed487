# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned (PyPI's wheels: CUDA builds, which run on a CPU as well).
TORCH := torch==2.14.1 torchvision==0.29.1
# Acts as on a CPU with (1) or without (0) native bf16, whatever this one has (bf16 is emulated, slowly, without).
BF16_SWITCH := TRANSFERKIT_NATIVE_BF16

.PHONY: setup demo test test-fast benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,lite,onnx,serve,loggers,inspect,shards]" $(TORCH)
	touch $@

demo: setup
	$(VENV)/bin/transferkit demo --workdir demo

# The whole suite, then the tests that compare numbers between two paths once more as on each kind
# of CPU, so that a change passes here only if it passes on both.
test: setup
	$(PY) -m pytest
	$(BF16_SWITCH)=1 $(PY) -m pytest -m precision
	$(BF16_SWITCH)=0 $(PY) -m pytest -m precision

# The quick suite (no compiles, subprocess trainings or DDP): a couple of minutes.
test-fast: setup
	$(PY) -m pytest -m "not slow"

benchmark: setup
	$(PY) benchmarks/feature_extract.py

clean:
	rm -rf $(VENV) demo runs .pytest_cache
