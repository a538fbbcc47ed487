# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned so that pip takes them from the local wheel mirror (CPU builds).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,lite,onnx]" $(TORCH)
	touch $@

demo: setup
	$(VENV)/bin/transferkit demo --workdir demo

test: setup
	$(PY) -m pytest

benchmark: setup
	$(PY) benchmarks/feature_extract.py

clean:
	rm -rf $(VENV) demo runs .pytest_cache
