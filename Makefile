# `make convert` converts the embedded tiny default; `make convert MODEL=gemma-4-31B-it` a shipped manifest.
# Every target sets up .venv/ first (pinned by requirements.lock; torch pinned to the CPU wheel).
PY      := .venv/bin/python
HLWQ    := .venv/bin/hlwq
STAMP   := .venv/.hlwq-installed
TSTAMP  := .venv/.hlwq-test-installed
MODEL   ?=
ARGS    ?=

.PHONY: setup convert test lint bench-quant bench-quality bench-rss clean

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.lock
	.venv/bin/pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)

# Triton only where torch brought none (a CUDA torch pins its own; replacing it would break torch.compile there).
$(TSTAMP): $(STAMP) tests/requirements.txt
	$(PY) -c "import triton" 2>/dev/null || .venv/bin/pip install -q --no-deps -r tests/requirements.txt
	touch $@

convert: setup
ifeq ($(MODEL),)
	$(HLWQ) tiny work/tiny-gemma4-bf16
	$(HLWQ) convert manifests/tiny-gemma4.yaml $(ARGS)
else
	$(HLWQ) convert manifests/$(MODEL).yaml $(ARGS)
endif

# The Slurm tests need Debian's slurm-wlm, the demo's browser test Debian's chromium + chromium-driver; the
# installers are no-ops when they are there (and skipped when not root).
test: setup $(TSTAMP)
	@if [ "$$(id -u)" = 0 ]; then bash .ci/install-slurm.sh || [ -z "$$CI" ]; fi
	@if [ "$$(id -u)" = 0 ]; then bash .ci/install-chromium.sh || [ -z "$$CI" ]; fi
	$(PY) -m pytest -q $(ARGS)

lint: setup
	.venv/bin/ruff check pipeline stages tests bench hlwq
	.venv/bin/ruff format --check pipeline stages tests bench hlwq
	.venv/bin/mypy

bench-quant: setup
	$(PY) bench/quant.py $(ARGS)

bench-quality: setup
	DISABLE_CUDA=1 .venv/bin/pip install -q --no-deps -r bench/requirements.txt
	$(PY) -m bench.quality $(ARGS)

bench-rss: setup
	$(PY) bench/rss.py $(ARGS)

clean:
	rm -rf work
