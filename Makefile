# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned (PyPI's wheels: CUDA builds, which run on a CPU as well).
TORCH := torch==2.14.1 torchvision==0.29.1
# Acts as on a CPU with (1) or without (0) native bf16, whatever this one has (bf16 is emulated, slowly, without).
BF16_SWITCH := TRANSFERKIT_NATIVE_BF16
# Acts as a CPU that reports AVX2 only: no native bf16, and ATen's and oneDNN's kernels limited to AVX2
# (transferkit.performance.AVX2_CPU_ENV; a no-op for the kernels on such a CPU).
AVX2_CPU := $(BF16_SWITCH)=0 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# Succeeds where a process with its VAR=value arguments set would run as this one (same bf16, same kernels).
SAME_CPU_KIND := $(PY) -c 'import sys; from transferkit.performance import same_cpu_kind; \
	sys.exit(not same_cpu_kind(dict(a.split("=", 1) for a in sys.argv[1:])))'
SKIPPED = echo "precision tests not run again as a CPU with $(1): the suite above ran as one"

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
# of CPU (native bf16; AVX2 only, its kernels included), so that a change passes here only if it passes on both.
# A pass is left out where this CPU is of that kind: the whole suite has just run as it.
test: setup
	$(PY) -m pytest
	$(SAME_CPU_KIND) $(BF16_SWITCH)=1 && $(call SKIPPED,native bf16) || $(BF16_SWITCH)=1 $(PY) -m pytest -m precision
	$(SAME_CPU_KIND) $(AVX2_CPU) && $(call SKIPPED,AVX2 only) || $(AVX2_CPU) $(PY) -m pytest -m precision

# The quick suite (no compiles, subprocess trainings or DDP): a couple of minutes.
test-fast: setup
	$(PY) -m pytest -m "not slow"

benchmark: setup
	$(PY) benchmarks/feature_extract.py

clean:
	rm -rf $(VENV) demo runs .pytest_cache
