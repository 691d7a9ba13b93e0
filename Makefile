# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (Python 3.11), install the pinned dependencies and the project, then run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SAT := swissarmytransformer==0.4.12

.PHONY: install demo test test-slow clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SAT)
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m research.visualglm.run_visualglm --config run_visualglm_tiny_image_to_text_generation.yaml --image_path examples/visualglm/shapes.png --prompt "描述这张图片。"

test: $(INSTALLED)
	$(PY) -m pytest -q

test-slow: $(INSTALLED)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) output
