# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: pip then takes the local CPU wheel instead of a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests

demo: $(STAMP)
	WANDB_MODE=offline OMP_WAIT_POLICY=PASSIVE $(PY) -m lightning_attrib experiment=demo

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'

clean:
	rm -rf $(VENV) outputs multirun attrib_out wandb
