# The two quick-start commands: `make demo` runs the embedded default experiment,
# `make test` runs the test suite. Both create (or reuse) .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test install data clean

demo: install data
	$(VENV)/bin/datamodels $(ARGS)

test: install data
	$(PY) -m pytest tests $(PYTEST_ARGS)

install: $(STAMP)

# torch is pinned first so that pip finds the CPU build on this kind of machine instead of
# pulling a multi-GB CUDA build; the project's own range (torch>=2.3) is then satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# Real Fashion-MNIST comes from Debian's dataset-fashion-mnist when apt is available.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "Fashion-MNIST not found at $(FMNIST) and apt is unavailable: set task.data.root=DIR"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) runs multirun outputs mlflow.db
