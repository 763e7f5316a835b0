# Two environments (design.md §2): .venv runs lvb, .venv-tpu runs tpu-mlir.
# Each is rebuilt only when pyproject.toml (where every pin lives) changes.
PYTHON311 ?= python3.11
PYTHON310 ?= $(shell PYENV_VERSION=3.10.13 pyenv which python3.10 2>/dev/null || command -v python3.10)
VENV := .venv
TPU_VENV := .venv-tpu
# tpu-mlir's wheel bundles Ubuntu 22.04's glibc, which breaks against this host's.
BUNDLED_GLIBC := libc.so.6 libm.so.6 libpthread.so.0
# The web page's test drives the distribution's Chromium (Playwright's own download needs
# a network we do not have); installed once, as root in CI.
CHROMIUM := /usr/bin/chromium

.PHONY: setup test demo clean

setup: $(VENV)/.installed $(TPU_VENV)/.installed $(CHROMIUM)

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON311) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev,serve]'
	touch $@

$(TPU_VENV)/.installed: pyproject.toml scripts/pins.py
	@test -n "$(PYTHON310)" || { echo "error: Python 3.10 not found; install it (pyenv install 3.10.13) or set PYTHON310=/path/to/python3.10"; exit 1; }
	test -x $(TPU_VENV)/bin/python || $(PYTHON310) -m venv $(TPU_VENV)
	$(PYTHON311) scripts/pins.py toolchain > $(TPU_VENV)/requirements.txt
	$(TPU_VENV)/bin/pip install --quiet -r $(TPU_VENV)/requirements.txt
	$(TPU_VENV)/bin/pip install --quiet --no-deps -e .
	cd $(TPU_VENV)/lib/python3.10/site-packages/tpu_mlir/lib/third_party && rm -f $(BUNDLED_GLIBC)
	touch $@

$(CHROMIUM):
	$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq
	$$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: setup
	$(VENV)/bin/python -m pytest

demo: setup
	scripts/demo.sh

clean:
	rm -rf $(VENV) $(TPU_VENV) work
