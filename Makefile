# `make demo` runs the main job on the embedded defaults; `make test` runs the suite.
# Both create .venv (python3 -m venv) and install the project into it when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raygen-installed
PYTEST ?= -q

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk (any other spec pulls a CUDA build).
	$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import raygen, torch, ray, deepspeed, mlflow" && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raygen demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST)

clean:
	rm -rf work .pytest_cache
