# Every target sets up the venv first (idempotent), so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Every code folder, for both tools: mypy strict over the first three, relaxed over tests and bench
# (pyproject's [tool.mypy] overrides: helpers may go unannotated, their bodies and calls are checked).
CODE := service models evaluation tests bench
# OpenVINO's model converter sends usage telemetry at every model load unless opted out (the image is).
# Its consent check declines under CI=true, so `make serve` sets it for the server process only; to opt
# out for good, for every command: .venv/bin/opt_in_out --opt_out.
NO_TELEMETRY := CI=true

.PHONY: help venv serve test unit lint docker-test eval bench bench-quick soak fuzz lock clean

help:  ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 20

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)  ## make .venv and install the locked dependencies (about 7 GB, 3 GB downloaded; see README)

serve: venv  ## serve the default model on 127.0.0.1:8000 (no OpenVINO telemetry)
	$(NO_TELEMETRY) $(BIN)/metta-serve

test: venv  ## the whole test suite, as CI runs it (METTA_SAMPLES_DIR=... adds the photo tests)
	$(BIN)/pytest $(PYTEST_ARGS)

unit: venv  ## tests/unit only
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: venv  ## ruff and mypy over every code folder
	$(BIN)/ruff check $(CODE)
	$(BIN)/mypy $(CODE)

# Scale-out on one machine: replicas behind a real HAProxy (Debian's haproxy): the split, a rolling update
# with zero failed requests, a SIGKILL (about a minute). METTA_LB_OUT=dir writes the figures as JSON.
.PHONY: lb-test
lb-test: venv  ## replicas behind a real HAProxy (about a minute)
	METTA_LB_TEST=1 $(BIN)/pytest tests/e2e/test_load_balancer.py -v -s $(PYTEST_ARGS)

# The container image built air-gapped and run for real (root; installs docker.io and debootstrap; 15 min cold).
docker-test: venv  ## build the image air-gapped and run it (root; 15 min cold)
	METTA_DOCKER_TEST=1 $(BIN)/pytest tests/e2e/test_docker_image.py -v -s $(PYTEST_ARGS)

# docs/quality.md: every figure of the quality study on ../shared/data/imagenet-sample (about an hour).
eval: venv  ## the quality study of docs/quality.md (needs the photos; about an hour)
	$(BIN)/metta eval --out docs/quality

# docs/benchmarks.md: R, the service against the peers, the batching sweep and a soak (about 40 minutes).
bench: venv  ## docs/benchmarks.md (about 40 minutes)
	$(BIN)/python -m bench.run

bench-quick: venv  ## a short benchmark (under 5 minutes)
	$(BIN)/python -m bench.run --quick --out /tmp/bench-quick

MINUTES ?= 10
soak: venv  ## MINUTES of overload and bad input
	$(BIN)/python -m bench.soak --minutes $(MINUTES) --out /tmp/soak.json

FUZZ_SECONDS ?= 300
fuzz: venv  ## fuzz the decoder for FUZZ_SECONDS
	$(BIN)/python -m tests.fuzz_decode --seconds $(FUZZ_SECONDS) --hypothesis

# Regenerate requirements-dev.lock from the venv (requirements.lock, the runtime subset, is edited by hand).
lock: venv  ## regenerate requirements-dev.lock from the venv
	{ echo "# Runtime + test/lint/bench tools, exact versions. Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -iv '^metta-serve'; } > requirements-dev.lock

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
