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

# The main job: train the tiny preset on the embedded corpus (~4 min on 2 CPU cores), then sample it.
RUN_DIR ?= runs/tiny
run: install
	$(VENV)/bin/moeco train --preset tiny --out $(RUN_DIR) --steps 300 --overwrite
	$(VENV)/bin/moeco generate $(RUN_DIR)/model --prompt "The for statement" --max-new-tokens 60 \
		--temperature 0.8 --top-p 0.95
	@echo "written: model $(RUN_DIR)/model, metrics $(RUN_DIR)/metrics.jsonl, plots $(RUN_DIR)/plots/, checkpoints $(RUN_DIR)/checkpoints/"

test: install-test
	$(PY) -m pytest

bench-cpu: install-test
	$(PY) bench/model_cpu.py

clean:
	rm -rf $(VENV) runs
