# Two commands (see README): `make demo` (set up + train on the demo corpus) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    ?= data/demo
MOTIONS ?= 2000
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-mix shards-demo shards-summary test test-fast lint clean

setup: $(STAMP)

# torch first: the pinned CPU build lies on these machines' disk; an unpinned torch would pull
# several GB of CUDA wheels. The rest comes pinned from constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The stamp names the shard format: demo shards of an older format are rebuilt, not refused.
DEMO_SHARDS := $(DEMO)/.shard-format-2
$(DEMO_SHARDS): | $(STAMP)
	$(PY) shards/make_shards.py demo --motions $(MOTIONS) --out $(DEMO) --workers 1 --overwrite
	touch $@

# Building the shards prints their summary once; `make shards-summary` prints it again.
shards-demo: $(DEMO_SHARDS)

shards-summary: $(DEMO_SHARDS)
	$(PY) shards/make_shards.py summary $(DEMO)

# The main job: train on the demo shards (one process, both cores), then print the test table.
# Ctrl-C saves a checkpoint and prints the command that continues the run (resume=latest).
demo: shards-demo
	$(PY) rehamot/train.py configs/demo.yaml data.shards=$(DEMO) $(ARGS)

# Several corpora in one model: two demo corpora (B as KIT-ML's 21 joints, 12.5 fps, Z up, mm)
# sharded through the joints source, trained on A, on B and on A+B, then the runs x test sets
# matrix. Writes data/demo-mix/ and runs/demo-mix/ anew each time. ARGS: training overrides.
demo-mix: $(STAMP)
	$(PY) shards/demo_mix.py $(ARGS)

# The whole suite (unit, multi-process, end-to-end): ~15 min on 2 idle cores.
test: $(STAMP)
	$(PY) -m pytest -q

# Unit tests only: ~1.2 min on 2 idle cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check rehamot shards tests benchmarks

clean:
	rm -rf $(VENV) data runs
