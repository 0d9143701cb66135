# Two entry points on a fresh machine: `make figures` and `make test`.
# Both create the virtual environment in .venv first (torch is installed alone,
# first, so that no dependency pulls a CUDA build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
EXECUTED := .cache/executed

.PHONY: figures figures-gemma-3-270m gemma-3-270m-saes gemma-3-270m-texts test env toy clean-cache

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# committed notebooks stay output-free: git strips outputs on add (.gitattributes)
	if git rev-parse --git-dir >/dev/null 2>&1; then $(VENV)/bin/nbstripout --install; fi
	touch $@

# $(call run_notebooks,OUTPUT FOLDER,PAPERMILL OPTIONS,ENVIRONMENT): every notebook top to
# bottom, each executed copy in OUTPUT FOLDER; $$name is the notebook's name in the options.
define run_notebooks
	@mkdir -p $(1)
	@for nb in $(NOTEBOOKS); do \
		name=$$(basename $$nb .ipynb); echo "== $$nb"; start=$$(date +%s); \
		$(3) $(PY) -m papermill --no-progress-bar -k python3 $(2) $$nb $(1)/$$name.ipynb \
			|| exit 1; \
		echo "   $$(( $$(date +%s) - start ))s"; \
	done
endef

# Run every notebook top to bottom on the embedded model; each writes its figure to figures/.
figures: $(VENV)/.installed
	$(call run_notebooks,$(EXECUTED))

# The real-model set: every notebook on Gemma 3 270M offline (converted from its PyPI
# package on first use), figures in figures/gemma-3-270m/. SETTINGS=cpu (default) applies
# the reductions in notebooks/settings/gemma-3-270m-cpu/; SETTINGS=writeup the writeup's.
REAL_PRESET := gemma-3-270m-offline
SETTINGS ?= cpu
figures-gemma-3-270m: $(VENV)/.installed
	@echo "Gemma 3 270M, $(SETTINGS) settings"
	$(call run_notebooks,$(EXECUTED)/gemma-3-270m,-p PRESET $(REAL_PRESET) \
		-f notebooks/settings/gemma-3-270m-$(SETTINGS)/$$name.yaml,\
		TVLIB_FIGURES_DIR=$(CURDIR)/figures/gemma-3-270m)

# Rebuild the offline Gemma 3 270M SAEs, corpus and model card in data/gemma-3-270m from
# model-written text and packaged English prose (installs the Debian and PyPI text sources;
# resumable: sampled text and residuals are cached). Options: ARGS="--train-tokens N ...".
gemma-3-270m-saes: $(VENV)/.installed
	$(PY) -m tvlib.offline_saes $(ARGS)

# Sample model-written texts for the build ahead of it and ship them in
# data/gemma-3-270m/generated (read there instead of sampled again, on any machine;
# resumable). TEXTS: how many (a multiple of 256).
TEXTS ?= 7680
gemma-3-270m-texts: $(VENV)/.installed
	$(PY) -m tvlib.offline_saes --texts-only --texts $(TEXTS) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest

# Rebuild the embedded model and SAEs from scratch, then re-measure its model card.
toy: $(VENV)/.installed
	$(PY) -m tvlib.toy train
	$(PY) -m tvlib.toy card

clean-cache:
	rm -rf .cache
