# Two entry points on a fresh machine: `make figures` and `make test`.
# Both create the virtual environment in .venv first (torch is installed alone,
# first, so that no dependency pulls a CUDA build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
EXECUTED := .cache/executed

.PHONY: figures test env toy clean-cache

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

test: $(VENV)/.installed
	$(PY) -m pytest

# Rebuild the embedded model and SAEs from scratch, then re-measure its model card.
toy: $(VENV)/.installed
	$(PY) -m tvlib.toy train
	$(PY) -m tvlib.toy card

clean-cache:
	rm -rf .cache
