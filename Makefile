# Set-up and entry points. Every target creates the virtual environment in
# .venv first, so each works on a fresh machine with Python 3.10 or newer.
#
#   make run                          run the pipeline from the pinned upstream commit
#   make run SOURCE=/path/to/data     run it on a local copy of the upstream data/ folder
#   make test                         run the test suite

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: install run test clean check-report benchmark

$(VENV)/installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/installed

run: install
ifdef SOURCE
	@# The shell, not make, makes the path absolute, so spaces in it survive.
	@# The value is quoted for DVC's -S syntax, where ( , = and ' have meanings.
	source_dir="$$(cd -- "$(SOURCE)" && pwd)" && \
	quoted="$$(printf '%s' "$$source_dir" | sed "s/'/\\\\'/g")" && \
	dvc exp run -S "data.source='$$quoted'"
else ifeq ($(origin SOURCE),command line)
	@# SOURCE= with nothing after it, for example from an unset shell variable.
	@echo "error: SOURCE is empty; give the folder of a local copy of the upstream data/ folder, or leave SOURCE out to download it" >&2 && exit 2
else
	dvc repro
endif

test: install
	$(BIN)/python -m pytest -ra

clean:
	rm -rf $(VENV) dvc_plots .pytest_cache

# Opens report/index.html in headless Chromium (Debian package chromium,
# install it with: apt-get install chromium) and checks its players and
# images; writes report/screenshot.png.
check-report: install
	$(BIN)/python -m pytest -ra -m browser tests/test_report.py

# Times every stage and the whole pipeline, cold and warm, against the usual
# librosa loop: make benchmark DATA=/path/to/AudioMNIST/data
benchmark: install
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/run.py --data '$(abspath $(DATA))' --runs 5
