"""The LatentSync benchmark (benchmarks/latentsync.py) end to end on the CPU with the tiny configs."""
import json

import pytest

from benchmarks.latentsync import (
    BASELINE,
    MUSETALK,
    NO_DEEPCACHE,
    TALKRT,
    check_targets,
    main,
    row_specs,
)


def test_row_specs_differ_only_where_the_docstring_says():
    specs = {s.label: s for s in row_specs("latentsync16", "musetalk", 20)}
    assert list(specs) == [TALKRT, NO_DEEPCACHE, BASELINE, MUSETALK]
    assert "model.denoise.deepcache=true" in specs[TALKRT].overrides
    assert "model.denoise.deepcache=false" in specs[NO_DEEPCACHE].overrides
    assert set(specs[BASELINE].overrides) - set(specs[TALKRT].overrides) == {
        "pipeline.stage_sync=true", "pipeline.encoder.workers=1", "pipeline.precision=float16"}
    assert all("model.denoise.steps=20" in specs[k].overrides for k in (TALKRT, NO_DEEPCACHE, BASELINE))
    assert specs[MUSETALK].config == "musetalk"
    assert [s.label for s in row_specs("latentsync16", None, 20)] == [TALKRT, NO_DEEPCACHE, BASELINE]


def test_targets_are_computed_from_the_rows():
    rows = [{"resolution": "720p", "path": TALKRT, "fps": 16.0, "speedup_vs_baseline": 5.5},
            {"resolution": "1080p", "path": TALKRT, "fps": 14.0, "speedup_vs_baseline": 1.0}]
    met, missed = check_targets(rows, "latentsync16", "cuda", 20)
    assert (met["fps_verdict"], met["speedup_verdict"], met["comparable"]) == ("meets", "meets", True)
    assert (missed["fps_verdict"], missed["speedup_verdict"]) == ("misses", "misses")
    (tiny,) = check_targets(rows[:1], "latentsync16-tiny", "cpu", 2)
    assert not tiny["comparable"] and "2 steps" in tiny["note"] and "cpu" in tiny["note"]


@pytest.mark.slow
def test_latentsync_benchmark_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench_latentsync.json"
    # one 16-frame chunk of speech over a 16-frame clip, 2 steps: every row is a real run, just short
    code = main(["--device", "cpu", "--resolutions", "360p", "--seconds", "0.64", "--speech-seconds", "0.64",
                 "--steps", "2", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_count"] >= 1
    section = data["pipeline"]
    assert (section["config"], section["musetalk_config"], section["steps"]) == ("latentsync16-tiny", "tiny", 2)
    rows = {r["path"]: r for r in section["rows"]}
    assert list(rows) == [TALKRT, NO_DEEPCACHE, BASELINE, MUSETALK]
    for r in rows.values():
        assert r["resolution"] == "360p" and r["frames"] == 16
        assert r["fps"] > 0 and r["seconds"] > 0 and r["peak_host_rss_mb"] > 0 and r["peak_gpu_mb"] == 0
        assert r["speedup_vs_baseline"] == pytest.approx(r["fps"] / rows[BASELINE]["fps"])
    assert (rows[TALKRT]["deepcache"], rows[NO_DEEPCACHE]["deepcache"], rows[BASELINE]["deepcache"]) == (True, False, True)
    assert rows[TALKRT]["steps"] == 2 and rows[MUSETALK]["steps"] is None
    assert "stage_sync True (talkrt: False)" in section["baseline_differences"]
    (target,) = data["targets"]
    assert target["resolution"] == "360p" and target["fps_verdict"] in ("meets", "misses")
    assert not target["comparable"]
    printed = capsys.readouterr().out
    assert "| resolution | path |" in printed
    for label in rows:
        assert f"| 360p | {label} |" in printed
    assert "frames/s at 20 steps with DeepCache: " in printed and "the baseline of this run: " in printed
