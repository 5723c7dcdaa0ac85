# Two commands matter: `make quickstart` (the whole pipeline on the embedded default) and
# `make test`. Both create .venv, install pinned dependencies and the Fashion-MNIST data if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch unless a GPU is present (then pip's default CUDA build of the same version).
TORCH  ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: quickstart test install data clean-runs mlflow-ui

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from the Debian package when missing and apt is usable; otherwise the job says
# where it looked (data.root, the package directory, the official download).
data:
	@if [ ! -f "$(FMNIST)" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	fi

quickstart: install data
	$(PY) jobs/pipeline.py --config conf/quickstart.yaml

test: install data
	$(PY) -m pytest -q tests

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/quickstart/mlflow.db

clean-runs:
	rm -rf runs
