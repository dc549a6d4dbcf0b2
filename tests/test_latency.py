"""Latency regression against tests/latency_baselines/<gpu-slug>.json (GPU only, ``pytest -m latency``).

Never runs in CI (the ``latency`` marker is excluded by default). Record a baseline with
``python -m benchmarks.latency_baseline --update``; prove the test bites by slowing a stage
(``--slowdown``, see stage_slowdown.py), which must make it fail::

    python -m pytest -q -m latency -o addopts="" --slowdown 3.unet=5 tests/test_latency.py
"""
import pytest
import torch

from benchmarks import latency_baseline as lb
from stage_slowdown import slow_stages, unmatched

pytestmark = [pytest.mark.latency, pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("latency regression needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def baseline() -> lb.Baseline:
    gpu = torch.cuda.get_device_name()
    path = lb.baseline_path(gpu)
    if not path.is_file():
        pytest.skip(f"no latency baseline for '{gpu}' ({path}); record one on this GPU with "
                    f"`{lb.UPDATE_HINT}` and commit it")
    return lb.load_baseline(path)


@pytest.fixture(scope="module")
def comparison(baseline, slowdown) -> lb.Comparison:
    base = baseline.measurement
    with slow_stages(slowdown) as stages:
        measured = lb.measure_latency(config=base.config, device="cuda", backend=base.backend,
                                      compose=base.compose, seconds=base.clip_seconds, repeats=base.repeats or 3)
    missed = unmatched(slowdown, stages)
    if missed:
        raise pytest.UsageError(f"--slowdown names {missed}, but the pipeline's stages are {sorted(stages)}")
    result = lb.compare(baseline, measured)
    print("\n" + result.table())
    return result


def test_per_stage_latency(comparison):
    failures = comparison.failures_for(total=False)
    assert not failures, "per-stage latency regression:\n" + "\n".join(failures)


def test_end_to_end_latency(comparison):
    failures = comparison.failures_for(total=True)
    assert not failures, "end-to-end latency regression:\n" + "\n".join(failures)
