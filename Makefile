# Two environments (README, "Environments"): .venv runs lvb, .venv-tpu runs tpu-mlir.
# Each is rebuilt only when pyproject.toml (where every pin lives) changes.
PYTHON311 ?= python3.11
PYTHON310 ?= $(shell PYENV_VERSION=3.10.13 pyenv which python3.10 2>/dev/null || command -v python3.10)
VENV := .venv
TPU_VENV := .venv-tpu
# The web page's test drives the distribution's Chromium (Playwright's own download needs
# a network we do not have); installed once, as root in CI.
CHROMIUM := /usr/bin/chromium

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed $(TPU_VENV)/.installed $(CHROMIUM)

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON311) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev,serve,cluster]'
	touch $@

$(TPU_VENV)/.installed: pyproject.toml scripts/pins.py
	@test -n "$(PYTHON310)" || { echo "error: Python 3.10 not found; install it (pyenv install 3.10.13) or set PYTHON310=/path/to/python3.10"; exit 1; }
	test -x $(TPU_VENV)/bin/python || $(PYTHON310) -m venv $(TPU_VENV)
	$(PYTHON311) scripts/pins.py toolchain > $(TPU_VENV)/requirements.txt
	$(TPU_VENV)/bin/pip install --quiet -r $(TPU_VENV)/requirements.txt
	$(TPU_VENV)/bin/pip install --quiet --no-deps -e .
	# tpu-mlir's bundled glibc breaks against this host's; lvb.toolchain.BUNDLED_GLIBC lists it.
	cd $(TPU_VENV)/lib/python3.10/site-packages/tpu_mlir/lib/third_party && rm -f $$($(CURDIR)/$(TPU_VENV)/bin/python -m lvb.toolchain)
	touch $@

$(CHROMIUM):
	$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq
	$$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: setup
	$(VENV)/bin/python -m pytest

# The inner loop: everything that needs neither tpu-mlir's simulator nor a whole pipeline
# (markers in pyproject.toml); `make test` stays the full suite CI runs.
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not toolchain and not slow"

demo: setup
	scripts/demo.sh

clean:
	rm -rf $(VENV) $(TPU_VENV) work
