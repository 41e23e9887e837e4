# One-time set-up is folded into both targets: a fresh Python 3.11 machine needs nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sslsteal-installed

.PHONY: demo test install clean
demo: $(STAMP)
	$(PY) launch/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes this release from the local wheel cache where there is one
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	# animal-mnist ships its images as data files; its declared deps (tensorflow, pandas) are not needed
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	# a third downstream set (Fashion-MNIST, MIT) ships as a Debian package; optional: needs root
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "note: dataset-fashion-mnist not installed; the demo probes animal-mnist and digits only"; fi
	touch $(STAMP)

clean:
	rm -rf runs/demo
