# grace_nb: the two commands a fresh machine needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grace-installed
export PATH := $(abspath $(BIN)):$(PATH)
# keep the Hugging Face libraries from trying the network: every model here is built from configs or local files
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0

.PHONY: install demo test sync-check nbtest pytest bench readme clean

## install: create .venv in the repository with everything (fast when already done)
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the torch/torchvision pair first (see the pins in pyproject.toml), then the project, then open_flamingo
	# without its obsolete torch==2.0.1 pin
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps open-flamingo==2.0.1
	$(BIN)/python -c "import torch, torchvision, open_clip, open_flamingo, transformers, nbdev, grace_nb; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| grace_nb', grace_nb.__version__)"
	touch $(STAMP)

## demo: install, then run the main job (tutorial-scale reproduction on the shapes corpus)
demo: install
	$(BIN)/grace reproduce --profile shapes --out runs/shapes

## test: install, check notebooks/library are in sync and clean, run every notebook, run pytest
test: install sync-check nbtest pytest

# nbdev-export / nbdev-clean must not change anything (CI fails otherwise): compare checksums around them
sync-check:
	@sum() { find nbs grace_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs md5sum; }; \
	before="$$(sum)"; $(BIN)/nbdev-export && $(BIN)/nbdev-clean; after="$$(sum)"; \
	if [ "$$before" != "$$after" ]; then echo "nbdev-export/nbdev-clean changed these files (run them and commit):"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^>' | awk '{print "  " $$3}'; exit 1; fi; \
	echo "sync-check: notebooks clean, grace_nb/ in sync"

nbtest:
	$(BIN)/nbdev-test --timing

pytest:
	$(BIN)/python -m pytest -q tests

## bench: the speed/memory benchmarks (not part of `make test`)
bench: install
	$(BIN)/python benchmarks/trie.py

## readme: regenerate README.md from nbs/index.ipynb offline (nbdev-readme needs Quarto)
readme: install
	$(BIN)/python -c "from nbdev.serve import proc_nbs; proc_nbs(file_glob='index.ipynb')" >/dev/null
	$(BIN)/jupyter nbconvert --to markdown _proc/index.ipynb --output-dir . --output README --log-level WARN

clean:
	rm -rf _proc _docs .pytest_cache
