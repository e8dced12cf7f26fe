# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The exact CPU pin: a looser spec pulls a multi-GB CUDA build (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: run test install install-test bench-cpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test,serve]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/moeco demo

test: install-test
	$(PY) -m pytest

bench-cpu: install-test
	$(PY) bench/model_cpu.py

clean:
	rm -rf $(VENV) runs
