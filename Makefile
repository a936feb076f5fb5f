# Two entry points do all the set-up: `make run` (demo on an embedded broker) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install system-deps run test lint typecheck unit soak bench bench-quix train accuracy clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,plots,librdkafka]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with dev extras

# Debian's prometheus package gives the real Prometheus server and promtool the tests use.
system-deps:  ## install prometheus/promtool from Debian's packages if missing (root or sudo)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

run: $(STAMP)  ## the daemon on an embedded broker with sample ticks flowing
	$(BIN)/pipeline run $(ARGS)

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

typecheck: $(STAMP)  ## mypy on pipeline/
	$(BIN)/mypy pipeline

unit: $(STAMP)  ## pytest (unit + integration on a real broker)
	$(BIN)/pytest -q $(ARGS)

test: system-deps lint typecheck unit  ## everything CI runs

SOAK_MINUTES ?= 30
soak: $(STAMP)  ## the randomized daemon test, seed after seed, for SOAK_MINUTES (default 30)
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/pytest -q -s -p no:cacheprovider -m soak tests/test_daemon_random.py

bench: $(STAMP) .venv-quix/.installed  ## benchmarks with their baselines (and the Quix peer)
	$(BIN)/python -m benchmarks $(ARGS)
	$(BIN)/python -m benchmarks e2e --client confluent-kafka --json out/bench-confluent.json $(ARGS)

# The Quix Streams peer of the e2e benchmark, in its own environment (quixstreams pins its own
# confluent-kafka); `make bench` drains with it when this exists.
.venv-quix/.installed:
	$(PY) -m venv .venv-quix
	.venv-quix/bin/pip install -q --disable-pip-version-check quixstreams==3.28.1 torch==2.13.0
	touch $@

bench-quix: .venv-quix/.installed  ## the Quix Streams peer app's environment for make bench

DATA ?= ../shared/data
train: $(STAMP)  ## retrain the shipped default model on the broad corpus (~20 min; command recorded in its metadata)
	$(BIN)/pipeline train --corpus broad --data $(DATA) --synthetic 400 --horizon 24 \
	  --layers 64,32 --loss mae --batch-lanes 16 --epochs 25 --patience 6 --lanes-per-epoch 1200 \
	  --val-warmup 500 --seed 0 --threads 1 --name broad-gru --out pipeline/models/default.pt

accuracy: $(STAMP)  ## train per data set and backtest: the README accuracy tables (~70 min)
	bash benchmarks/accuracy.sh $(DATA) out/accuracy

clean:
	rm -rf $(VENV) .venv-quix .mypy_cache .pytest_cache .ruff_cache
