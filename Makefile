# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

# pip installs without its bytecode pass, which runs on one core, and compileall compiles on
# all cores instead (measured here: 1 min 22 s to install, 37 s to compile); with
# PYTHONDONTWRITEBYTECODE set, as on this machine, nothing would be cached at import time.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]' 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]:-0} -eq 0
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	$(BIN)/python -c "import torch, torchvision, ray, dynray"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dynray demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .dynray out .pytest_cache
