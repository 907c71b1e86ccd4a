# Quick start: `make demo` and `make test`. Each target sets up what it needs, idempotently.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmkit-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data browser test demo clean-demo

setup: $(STAMP)

# torch==2.13.0 first, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST and the colour emoji font from Debian (IDX files in /usr/share/datasets/fashion-mnist).
DEBS := dataset-fashion-mnist fonts-noto-color-emoji
EMOJI := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
data:
	@(test -f $(FMNIST) && test -f $(EMOJI)) || (apt-get install -y -q $(DEBS) >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(DEBS) >/dev/null 2>&1) \
	  || echo "note: could not install $(DEBS) with apt; those presets will ask for data.root")

# Debian's chromium for the browser test of `cmkit serve` (tests/test_serve.py drives it with Playwright through
# executable_path; Playwright's own browser download is never used).
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || (apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: could not install chromium with apt; the browser tests of cmkit serve will be skipped")

test: $(STAMP) data browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

demo: $(STAMP) data
	$(PY) -m cmkit.demo
