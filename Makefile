# Two entry points on a fresh machine: `make figures` and `make test`.
# Both create the virtual environment in .venv first (torch is installed alone,
# first, so that no dependency pulls a CUDA build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
EXECUTED := .cache/executed

.PHONY: figures figures-gemma-3-270m gemma-3-270m-saes test env toy clean-cache

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Run every notebook top to bottom on the embedded model; each writes its figure to figures/.
figures: $(VENV)/.installed
	@mkdir -p $(EXECUTED)
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); \
		$(PY) -m papermill --no-progress-bar -k python3 $$nb $(EXECUTED)/$$(basename $$nb) || exit 1; \
		echo "   $$(( $$(date +%s) - start ))s"; \
	done

# The real-model set: every notebook on Gemma 3 270M offline (converted from its PyPI
# package on first use), figures in figures/gemma-3-270m/. SETTINGS=cpu (default) applies
# the reductions in notebooks/settings/gemma-3-270m-cpu/; SETTINGS=writeup the writeup's.
REAL_PRESET := gemma-3-270m-offline
SETTINGS ?= cpu
figures-gemma-3-270m: $(VENV)/.installed
	@mkdir -p $(EXECUTED)/gemma-3-270m
	@for nb in $(NOTEBOOKS); do \
		name=$$(basename $$nb .ipynb); echo "== $$nb ($(SETTINGS) settings)"; start=$$(date +%s); \
		TVLIB_FIGURES_DIR=$(CURDIR)/figures/gemma-3-270m $(PY) -m papermill --no-progress-bar \
			-k python3 -p PRESET $(REAL_PRESET) -f notebooks/settings/gemma-3-270m-$(SETTINGS)/$$name.yaml \
			$$nb $(EXECUTED)/gemma-3-270m/$$name.ipynb || exit 1; \
		echo "   $$(( $$(date +%s) - start ))s"; \
	done

# Rebuild the offline Gemma 3 270M SAEs, corpus and model card in data/gemma-3-270m.
gemma-3-270m-saes: $(VENV)/.installed
	$(PY) -m tvlib.offline_saes

test: $(VENV)/.installed
	$(PY) -m pytest

# Rebuild the embedded model and SAEs from scratch, then re-measure its model card.
toy: $(VENV)/.installed
	$(PY) -m tvlib.toy train
	$(PY) -m tvlib.toy card

clean-cache:
	rm -rf .cache
