# Every target sets up the venv first (idempotent), so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv serve test unit lint docker-test eval bench bench-quick soak fuzz lock clean

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

serve: venv
	$(BIN)/metta-serve

test: venv
	$(BIN)/pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check service models tests bench
	$(BIN)/mypy

# Scale-out on one machine: replicas behind a real HAProxy (Debian's haproxy): the split, a rolling update
# with zero failed requests, a SIGKILL (about a minute). METTA_LB_OUT=dir writes the figures as JSON.
.PHONY: lb-test
lb-test: venv
	METTA_LB_TEST=1 $(BIN)/pytest tests/e2e/test_load_balancer.py -v -s $(PYTEST_ARGS)

# The container image built air-gapped and run for real (root; installs docker.io and debootstrap; 15 min cold).
docker-test: venv
	METTA_DOCKER_TEST=1 $(BIN)/pytest tests/e2e/test_docker_image.py -v -s $(PYTEST_ARGS)

# docs/quality.md: every figure of the quality study on ../shared/data/imagenet-sample (about an hour).
eval: venv
	$(BIN)/metta eval --out docs/quality

# docs/benchmarks.md: R, the service against the peers, the batching sweep and a soak (about 40 minutes).
bench: venv
	$(BIN)/python -m bench.run

bench-quick: venv
	$(BIN)/python -m bench.run --quick --out /tmp/bench-quick

MINUTES ?= 10
soak: venv
	$(BIN)/python -m bench.soak --minutes $(MINUTES) --out /tmp/soak.json

FUZZ_SECONDS ?= 300
fuzz: venv
	$(BIN)/python -m tests.fuzz_decode --seconds $(FUZZ_SECONDS) --hypothesis

# Regenerate requirements-dev.lock from the venv (requirements.lock, the runtime subset, is edited by hand).
lock: venv
	{ echo "# Runtime + test/lint/bench tools, exact versions. Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -iv '^metta-serve'; } > requirements-dev.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
