# spotrelay developer entry points. `make run` and `make test` set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-setup
# The ports `make run` uses: PORT for HTTP, PORT+1 for the Autowalk callback (and PORT+2 for
# RTSP), so one PORT=N moves them all. ARGS: more options (see README, Configuration).
PORT ?= 21080
MISSION_PORT ?= $(shell expr $(PORT) + 1)
RTSP_PORT ?= $(shell expr $(PORT) + 2)
ARGS ?=
CAPTURES ?= .cache/captures

.PHONY: setup run mission-demo test test-fast lint fmt bench bench-trust soak lock clean
SOAK_SECONDS ?= 600

setup: $(STAMP)

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	packaging/link-gi.sh $(VENV)
	touch $(STAMP)

## Live cameras from the built-in simulated robot at http://127.0.0.1:$(PORT)/, with the Autowalk
## callback registered in the simulated robot's directory (gRPC on $(MISSION_PORT), captures in
## $(CAPTURES)). The command is not echoed: ARGS may hold a token.
RUN = $(BIN)/spotrelay --sim --bind 127.0.0.1 --port $(PORT) --mission \
  --mission-port $(MISSION_PORT) --rtsp-port $(RTSP_PORT) --captures-dir $(CAPTURES)
run: setup
	@echo "spotrelay on http://127.0.0.1:$(PORT)/ (Autowalk callback on $(MISSION_PORT), RTSP on $(RTSP_PORT))$(if $(ARGS), with ARGS)"
	@$(RUN) $(ARGS)

## What an Autowalk mission does at a waypoint, against `make run` (same PORT): stills, a clip.
mission-demo: setup
	@$(BIN)/spotrelay mission-demo --relay http://127.0.0.1:$(PORT) --callback 127.0.0.1:$(MISSION_PORT) $(ARGS)

## Everything: ruff, then in-process and end-to-end tests, with coverage (fails under 85 %).
test: lint
	$(BIN)/pytest -q $(ARGS)

## In-process tests only (plan, codec, schedule, hub, HTTP handlers, config): seconds.
test-fast: setup
	$(BIN)/pytest -q -m "not e2e" --no-cov $(ARGS)

lint: setup
	$(BIN)/ruff check extension tests packaging
	$(BIN)/ruff format --check extension tests packaging

fmt: setup
	$(BIN)/ruff format extension tests packaging
	$(BIN)/ruff check --fix extension tests packaging

bench: setup
	$(BIN)/python -m tests.bench $(ARGS)

## The relay under a long attack (viewers churning, stalling, slowloris, snapshot floods, robot
## faults each minute): memory and descriptors bounded, viewers served, no secret logged.
soak: setup
	$(BIN)/python -m tests.soak --seconds $(SOAK_SECONDS) $(ARGS)

## Issue 19's attacks on the Autowalk port and the captures routes, each row rerun against this
## checkout and, with BEFORE=<another checkout>/extension (e.g. main's), that one too.
bench-trust: setup
	$(BIN)/python -m tests.bench_trust $(if $(BEFORE),--before $(BEFORE)) $(ARGS)

## Re-pin runtime dependencies from pyproject's ranges (needs the registry).
lock:
	rm -rf .lockenv && $(PY) -m venv .lockenv && .lockenv/bin/pip install --quiet .
	.lockenv/bin/pip freeze --exclude spotrelay > requirements.lock.new
	rm -rf .lockenv && mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) dist build .pytest_cache .ruff_cache

# Further targets (container image, .spx, ...) live in mk/*.mk.
-include mk/*.mk
