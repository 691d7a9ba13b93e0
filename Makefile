# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (Python 3.11), install the pinned dependencies and the project, then run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SAT := swissarmytransformer==0.4.12
# pytest-xdist workers; each test file runs in one worker, so its shared fixtures are built once
TEST_WORKERS ?= 2

.PHONY: install demo test test-slow clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	@echo "installing the pinned dependencies into $(VENV) (MindSpore, MindFormers, torch for the tests; about 4 minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SAT)
	touch $(INSTALLED)
	@echo "installed; to run the scripts yourself: source $(VENV)/bin/activate"

demo: $(INSTALLED)
	$(PY) -m research.visualglm.demo
	$(PY) -m research.chatglm2.demo

test: $(INSTALLED)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(INSTALLED)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow

clean:
	rm -rf $(VENV) output
