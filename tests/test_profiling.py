"""Profiling helpers, the latency comparison, the report writer and the real-time audio rule (CPU, fast)."""
import json
import platform
import sqlite3
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from talkrt import profiling
from benchmarks import latency_baseline as lb
from benchmarks import profile as prof
from benchmarks import report
from benchmarks.common import gpu_slug, machine_info, percentiles
from benchmarks.realtime import AudioTiming, BatchSizeResult, FrameLatency
from talkrt.serve.audio import gather_windows
from talkrt.config import load_config
from talkrt.models.audio import AudioFeatures
from talkrt.profiling import StageClock, nvtx_range, torch_profiler_ranges
from stage_slowdown import parse_slowdown, slow_stages, unmatched


# ----------------------------------------------------------------------------- StageClock / ranges

def test_stage_clock_accumulates_per_stage():
    clock = StageClock()
    for b in range(3):
        with clock.stage("1.frames", b, 4):
            pass
        with clock.stage("3.unet", b, 4):
            time.sleep(0.002)
    assert clock.calls == {"1.frames": 3, "3.unet": 3}
    assert clock.seconds["3.unet"] >= 0.006 > clock.seconds["1.frames"]
    table = clock.table(12)
    assert [name for name, _, _ in table] == ["1.frames", "3.unet"]
    assert sum(share for _, _, share in table) == pytest.approx(1.0)
    assert clock.ms_per_frame(12)["3.unet"] == pytest.approx(1000 * clock.seconds["3.unet"] / 12)


def test_slowdown_slows_only_the_named_stage_and_only_inside_the_block():
    with slow_stages({"unet": 5}) as seen:                     # short name matches "3.unet"
        clock = StageClock()
        with clock.stage("3.unet", 0, 2):                      # 5 ms per frame x 2 frames
            pass
        with clock.stage("4.vae_decode", 0, 2):
            pass
        with clock.stage("audio_features"):                    # no frames: once
            pass
    assert seen == {"3.unet", "4.vae_decode", "audio_features"}
    assert clock.seconds["3.unet"] >= 0.010 and clock.calls["3.unet"] == 1
    assert clock.seconds["4.vae_decode"] < 0.005
    assert unmatched({"unet": 5, "3.unte": 1}, seen) == ["3.unte"]
    after = StageClock()                                       # the patch is gone
    with after.stage("3.unet", 0, 2):
        pass
    assert after.seconds["3.unet"] < 0.005


def test_slowdown_by_full_name_counts_once_without_frames():
    with slow_stages({"audio_features": 20, "3.unet": 0}):
        clock = StageClock()
        with clock.stage("audio_features"):
            pass
        with clock.stage("3.unet", 0, 8):
            pass
    assert 0.020 <= clock.seconds["audio_features"] < 0.5
    assert clock.seconds["3.unet"] < 0.005


def test_parse_slowdown():
    assert parse_slowdown(" 3.unet=5, compose=2.5 ") == {"3.unet": 5.0, "compose": 2.5}
    assert parse_slowdown(None) == {} and parse_slowdown("") == {}
    for bad in ("unet", "unet=fast", "=3", "unet=-1"):
        with pytest.raises(ValueError, match="stage=milliseconds"):
            parse_slowdown(bad)


def test_nvtx_range_is_a_shared_noop_without_formatting_when_off():
    profiling.configure_ranges(nvtx=False)
    try:
        first = nvtx_range("batch %d", "not-an-int")   # would raise TypeError if formatted
        assert first is nvtx_range("other") is profiling._NULL
        with first:
            pass
    finally:
        profiling.configure_ranges(reset=True)


def test_torch_profiler_sees_stage_and_helper_ranges():
    profiling.configure_ranges(nvtx=False)
    try:
        clock = StageClock()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            with torch_profiler_ranges():
                with nvtx_range("decode batch=%d", 7):
                    torch.ones(2) + 1
                with clock.stage("3.unet", 0, 4):
                    torch.ones(2) * 2
            with clock.stage("4.vae_decode", 0, 4):   # outside: no range
                pass
        names = {e.name for e in p.events()}
    finally:
        profiling.configure_ranges(reset=True)
    assert "decode batch=7" in names
    assert "3.unet batch=0 frames=4" in names
    assert not any(n.startswith("4.vae_decode") for n in names)


# ----------------------------------------------------------------------------- GPU busy / profile table

def test_union_length_merges_overlaps_and_clips_to_window():
    assert prof.union_length([(0, 2), (1, 3), (5, 6), (10, 20)], (0, 12)) == pytest.approx(3 + 1 + 2)
    assert prof.union_length([], (0, 1)) == 0
    assert prof.union_length([(-5, 1), (2, 2.5)], (0, 10)) == pytest.approx(1.5)


def test_gpu_busy_from_chrome_trace():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": prof.RUN_RANGE, "ts": 1000, "dur": 10_000},
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 2000, "dur": 3000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 4000, "dur": 2000},   # overlaps k1
        {"ph": "X", "cat": "kernel", "name": "warmup", "ts": 0, "dur": 500},      # before the run
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 3000, "dur": 5000},
    ]}
    busy = prof.gpu_busy_from_chrome_trace(trace)
    assert busy.busy_s == pytest.approx(0.004) and busy.window_s == pytest.approx(0.010)
    assert busy.idle_s == pytest.approx(0.006) and busy.idle_share == pytest.approx(0.6)
    assert busy.intervals == 2
    assert prof.gpu_busy_from_chrome_trace({"traceEvents": trace["traceEvents"][1:]}) is None


def test_gpu_busy_from_nsys_sqlite(tmp_path):
    path = tmp_path / "r.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE StringIds (id INTEGER, value TEXT)")
    con.execute("CREATE TABLE NVTX_EVENTS (start INT, end INT, text TEXT, textId INT)")
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT, end INT)")
    con.execute("INSERT INTO StringIds VALUES (3, ?)", (prof.RUN_RANGE,))
    con.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?)",
                    [(0, 100, "3.unet batch=0 frames=4", None), (1000, 3000, None, 3)])
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?)", [(1100, 1600), (1500, 2000), (10, 50)])
    con.commit()
    con.close()
    busy = prof.gpu_busy_from_nsys_sqlite(path)
    assert busy.window_s == pytest.approx(2000e-9) and busy.busy_s == pytest.approx(900e-9)


def test_summary_adds_other_and_reports_gpu_idle():
    table = [("3.unet", 30.0, 0.75), ("4.vae_decode", 10.0, 0.25)]
    s = prof.summarise(table, frames=10, wall_s=0.5, config="musetalk", device="cuda", tool="torch.profiler",
                       gpu=prof.GpuBusy(busy_s=0.3, window_s=0.5, intervals=9))
    assert [r.name for r in s.stages] == ["3.unet", "4.vae_decode", "other"]
    assert s.stages[0].share == pytest.approx(0.6) and s.stages[2].ms_per_frame == pytest.approx(10.0)
    text = prof.format_summary(s)
    assert "GPU idle: 200.0 ms of 500.0 ms wall (40.0%)" in text
    cpu = prof.summarise(table, 10, 0.4, config="tiny", device="cpu", tool="torch.profiler", gpu=None)
    assert [r.name for r in cpu.stages] == ["3.unet", "4.vae_decode"]
    assert "GPU idle: n/a (CPU run)" in prof.format_summary(cpu)
    assert cpu.to_section()["stages"] == {"3.unet": 30.0, "4.vae_decode": 10.0}


def test_nsys_command_is_an_argument_list_with_the_required_traces(tmp_path):
    cmd = prof.nsys_command("/usr/bin/nsys", tmp_path, ["--out", str(tmp_path), "--config", "musetalk"])
    assert cmd[:2] == ["/usr/bin/nsys", "profile"]
    assert cmd[cmd.index("--trace") + 1] == "cuda,nvtx,osrt"
    assert cmd[cmd.index("--gpu-video-device") + 1] == "all"
    assert cmd[cmd.index("-o") + 1] == str(tmp_path / "talkrt")
    assert cmd[-1] == prof.CHILD_FLAG and "benchmarks.profile" in cmd


# ----------------------------------------------------------------------------- latency comparison

def _measurement(**stages: float) -> lb.Measurement:
    total = stages.pop("total", sum(stages.values()) + 1.0)
    return lb.Measurement(gpu="NVIDIA H200", config="musetalk", backend="tensorrt", compose="gpu", batch_size=16,
                          clip_seconds=2.0, frames=50, stages_ms={k.replace("_", "."): v for k, v in stages.items()},
                          total_ms=total)


BASE = lb.Baseline(_measurement(**{"3_unet": 4.0, "4_vae": 2.0}, total=8.0))


def test_within_tolerance_and_faster_pass():
    assert lb.compare(BASE, _measurement(**{"3_unet": 4.0 * 1.25 + 1.9, "4_vae": 2.0}, total=8.0)).ok
    faster = lb.compare(BASE, _measurement(**{"3_unet": 1.0, "4_vae": 0.5}, total=3.0))
    assert faster.ok and all(c.ok for c in faster.checks)


def test_slower_stage_fails_naming_stage_and_numbers():
    result = lb.compare(BASE, _measurement(**{"3_unet": 9.5, "4_vae": 2.0}, total=8.0))
    assert not result.ok
    assert len(result.failures) == 1
    msg = result.failures[0]
    assert "'3.unet'" in msg and "9.50" in msg and "4.00" in msg and "7.00" in msg   # limit 4*1.25+2
    assert result.failures_for(total=False) == [msg] and result.failures_for(total=True) == []
    assert "SLOWER" in result.table()


def test_slower_total_fails():
    result = lb.compare(BASE, _measurement(**{"3_unet": 4.0, "4_vae": 2.0}, total=12.5))
    assert [f.split(":")[0] for f in result.failures_for(total=True)] == ["'total'"]


def test_missing_stage_fails_and_new_stage_is_a_note():
    result = lb.compare(BASE, _measurement(**{"3_unet": 4.0, "5_compose": 1.0}, total=8.0))
    assert any("'4.vae'" in f and "not measured" in f for f in result.failures)
    assert any("5.compose" in n for n in result.notes)


def test_setup_mismatch_fails():
    other = lb.Measurement(**{**_measurement(**{"3_unet": 4.0, "4_vae": 2.0}, total=8.0).to_dict(),
                              "backend": "compiled"})
    result = lb.compare(BASE, other)
    assert any("backend='tensorrt'" in f and "backend='compiled'" in f for f in result.failures)


def test_tolerance_from_file_and_per_stage_override(tmp_path):
    path = lb.save_baseline(tmp_path / "g.json", BASE.measurement, {"gpu": {"name": "NVIDIA H200"}})
    data = json.loads(path.read_text())
    data["tolerance"] = {"relative": 0.1, "absolute_ms": 0.0}
    data["stage_tolerance"] = {"4.vae": {"relative": 1.0}}
    path.write_text(json.dumps(data))
    loaded = lb.load_baseline(path)
    assert loaded.measurement == BASE.measurement
    assert loaded.tolerance_for("4.vae") == lb.Tolerance(1.0, 0.0)
    result = lb.compare(loaded, _measurement(**{"3_unet": 4.5, "4_vae": 3.9}, total=8.0))
    assert [f.split(":")[0] for f in result.failures] == ["'3.unet'"]     # 4.5 > 4.4; 3.9 <= 4.0
    resaved = lb.load_baseline(lb.save_baseline(path, _measurement(**{"3_unet": 1.0}), {}, loaded))
    assert resaved.tolerance == loaded.tolerance and resaved.measurement.stages_ms == {"3.unet": 1.0}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="--update"):
        lb.load_baseline(tmp_path / "bad.json")


@pytest.mark.parametrize("name, slug", [("NVIDIA H200", "nvidia-h200"),
                                        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                        ("  NVIDIA A100-SXM4-40GB ", "nvidia-a100-sxm4-40gb")])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug
    assert lb.baseline_path(name).name == f"{slug}.json"


def test_gpu_slug_rejects_empty():
    with pytest.raises(ValueError):
        gpu_slug(" -- ")


# ----------------------------------------------------------------------------- report

RESULTS = {
    "engines": {"rows": [{"model": "unet", "backend": "tensorrt", "batch": 1, "ms": 2.0},
                         {"model": "unet", "backend": "tensorrt", "batch": 8, "ms": 8.0, "fps": 1000.0},
                         {"model": "unet", "backend": "eager", "batch": 8, "ms": 20.0},
                         {"model": "unet", "backend": "broken"}]},
    "pipeline": {"stages": {"3.unet": 4.0, "4.vae_decode": 2.0}, "fps": 150.0},
    "realtime": {"rows": [{"batch": 1, "p50_ms": 20.0, "p95_ms": 30.0, "p99_ms": 35.0}], "target_p95_ms": 40.0},
    "custom": {"x": 1},
}


def test_fps_rows_derive_fps_and_skip_bad_rows(caplog):
    rows = report.fps_rows(RESULTS["engines"], "model", "backend")
    assert [r["fps"] for r in rows] == [500.0, 1000.0, 400.0]
    assert "skipped 1 row" in caplog.text


def test_write_report_tolerates_missing_sections(tmp_path):
    json_path, md_path, pngs = report.write_report({"machine": {"gpu": None}}, tmp_path, plots=False)
    assert pngs == [] and json.loads(json_path.read_text())["machine"] == {"gpu": None}
    assert "# talkrt benchmark report" in md_path.read_text()


def test_write_report_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    json_path, md_path, pngs = report.write_report(RESULTS, tmp_path)
    md = md_path.read_text()
    assert "| unet | eager | 8 | 20.00 | 400.00 |" in md
    assert "| 3.unet | 4.00 |" in md and "| **total** | 6.00 |" in md
    assert "p95 < 40 ms" in md and "custom" in md
    assert sorted(p.name for p in pngs) == ["engines_fps.png", "stages.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert json.loads(json_path.read_text())["machine"]["cpu_count"] >= 1   # filled in when absent


def test_plots_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, caplog):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    _, md_path, pngs = report.write_report(RESULTS, tmp_path)
    assert pngs == [] and "matplotlib is not installed" in caplog.text
    assert "| unet | tensorrt | 1 | 2.00 | 500.00 |" in md_path.read_text()


def test_merge_results_concatenates_and_infers_sections(tmp_path):
    a = tmp_path / "bench_engines.json"
    a.write_text(json.dumps({"rows": [{"model": "vae", "backend": "eager", "batch": 4, "ms": 4.0}]}))
    b = tmp_path / "bench_b.json"
    b.write_text(json.dumps({"machine": {"gpu": {"name": "NVIDIA H200"}}, **RESULTS}))
    c = tmp_path / "bench_c.json"
    c.write_text(json.dumps({"pipeline": {"label": "b16", "stages": {"3.unet": 3.0}}}))
    paths = report.expand_inputs([str(tmp_path / "bench_*.json")])
    merged = report.merge_results([(str(p), json.loads(p.read_text())) for p in paths])
    assert len(merged["engines"]["rows"]) == 5
    assert merged["machine"]["gpu"]["name"] == "NVIDIA H200"
    assert [r["label"] for r in report.stage_runs(merged)] == ["pipeline 1", "b16"]
    assert len(merged["sources"]) == 3
    with pytest.raises(ValueError, match="no known section"):
        report.merge_results([("x.json", {"rows": []})])
    with pytest.raises(FileNotFoundError):
        report.expand_inputs([str(tmp_path / "nothing_*.json")])


def test_report_cli(tmp_path, capsys):
    src = tmp_path / "bench_pipeline.json"
    src.write_text(json.dumps({"pipeline": RESULTS["pipeline"], "machine": {"gpu": None}}))
    assert report.main(["--inputs", str(src), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and "report:" in capsys.readouterr().out


def test_machine_info_has_versions_and_no_hostname():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert not {"hostname", "node", "host"} & set(info)
    if len(platform.node()) >= 4:
        assert platform.node() not in json.dumps(info)


# ----------------------------------------------------------------------------- real-time audio rule

def test_audio_timing_at_25_fps():
    t = AudioTiming(num_samples=16000, fps=Fraction(25), pad_left_steps=4, window_steps=10)
    assert t.num_frames == 25 and t.total_steps == 50 and t.packet_samples == 320
    assert t.last_step(0) == 5 and t.last_step(3) == 11           # floor(50 i/25) + 10 - 4 - 1
    assert t.samples_needed(0) == 6 * 320 and t.arrival_s(6 * 320) == pytest.approx(0.12)
    assert t.lookahead_ms(0) == pytest.approx(120) and t.lookahead_ms(10) == pytest.approx(120)
    assert t.samples_needed(22) == 16000                          # step 49 is the last real one
    assert t.samples_needed(24) == 16000                          # in the right padding
    assert t.arrival_s(1) == pytest.approx(0.02) and t.arrival_s(321) == pytest.approx(0.04)
    short = AudioTiming(num_samples=16000 + 100, fps=Fraction(25), pad_left_steps=4, window_steps=10)
    assert short.arrival_s(16100) == pytest.approx(16100 / 16000)  # last, partial packet
    assert t.arrived_samples(0.019) == 0 and t.arrived_samples(0.0401) == 640 and t.arrived_samples(9) == 16000


@pytest.fixture(scope="module")
def features():
    cfg = load_config("tiny")
    return AudioFeatures(None, cfg.model.audio, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001)])
def test_gather_windows_matches_offline_windows(features, fps):
    torch.manual_seed(0)
    total = 200
    states = torch.randn(total, 3, 8)
    frames = np.arange(int(total / 50 * float(fps)))
    expected = features.windows(features.pad(states), frames, fps)
    got = gather_windows(states, 0, total, frames, fps, features.cfg)
    assert torch.equal(got, expected)
    # a window that starts later serves the later frames identically
    late = frames[frames >= 60]
    assert torch.equal(gather_windows(states[40:], 40, total, late, fps, features.cfg),
                       features.windows(features.pad(states), late, fps))
    with pytest.raises(RuntimeError, match="needs Whisper step"):
        gather_windows(states[40:], 40, total, np.array([0]), fps, features.cfg)


def test_batch_size_result_percentiles():
    rows = [FrameLatency(i, i // 4, float(i), 1.0) for i in range(101)]
    r = BatchSizeResult.from_frames(4, rows, wall_s=2.0, stages_ms={})
    assert (r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms) == (50.0, 95.0, 99.0, 100.0)
    assert r.compute_p95_ms == 1.0 and r.row()["frames"] == 101
    assert np.isnan(percentiles([])["p95"])


def test_native_outputs_of_the_other_benchmarks_are_rendered(tmp_path):
    engines = {"device": "cuda", "ms": {"tensorrt": {"unet": {"1": 2.0, "16": 8.0}}, "eager": {"unet": {"16": 32.0}}}}
    kernels = {"gpu": "NVIDIA H200", "rows": [{"op": "compose_nv12", "resolution": "1080p", "batch": 32,
                                               "gpu_us": 50.0, "cpu_us": 5000.0, "cvcuda_us": None}]}
    pipeline = {"config": "musetalk", "rows": [{"resolution": "720p", "path": "talkrt", "fps": 300.0,
                                                "stages_ms_per_frame": {"3.unet": 2.0}}]}
    inputs = []
    for name, data in (("bench_engines.json", engines), ("bench_kernels.json", kernels),
                       ("bench_pipeline.json", pipeline)):
        inputs.append((str(tmp_path / name), data))
    merged = report.merge_results(inputs)
    eng = report.fps_rows(merged["engines"], "model", "backend", "engines")
    assert sorted((r["backend"], r["batch"], r["fps"]) for r in eng) == [("eager", 16, 500.0), ("tensorrt", 1, 500.0),
                                                                         ("tensorrt", 16, 2000.0)]
    ker = report.fps_rows(merged["kernels"], "kernel", "impl", "kernels")
    assert {(r["kernel"], r["impl"], r["fps"]) for r in ker} == {("compose_nv12 1080p", "gpu kernels", 20000.0),
                                                                ("compose_nv12 1080p", "cpu", 200.0)}
    _, md_path, _ = report.write_report(merged, tmp_path / "out", plots=False)
    md = md_path.read_text()
    assert "| 720p talkrt | 2.00 |" not in md and "| 3.unet | 2.00 |" in md and "| frames/s | 300.00 |" in md
    assert "720p talkrt" in md and "| compose_nv12 1080p | cpu | 32 | 160.00 | 200.00 |" in md


class _FakeEvent:
    """Stands in for a CUDA event: completes when the fake stream's clock passes its time."""

    def __init__(self, stream, t_ms):
        self.stream, self.t_ms = stream, t_ms

    def query(self):
        return self.stream.now_ms >= self.t_ms

    def synchronize(self):
        self.stream.now_ms = max(self.stream.now_ms, self.t_ms)

    def elapsed_time(self, end):
        assert self.query() and end.query(), "elapsed_time on an unfinished event"
        return end.t_ms - self.t_ms


def test_stage_event_totals_fold_completed_pairs_and_keep_only_in_flight_ones():
    from types import SimpleNamespace

    from talkrt.profiling import StageEventTotals
    stream = SimpleNamespace(now_ms=0.0)
    totals = StageEventTotals()
    for i in range(1000):                        # batch i's unet spans [10i, 10i + 3] ms of stream time
        stream.now_ms = 10.0 * i - 25.0          # the GPU runs ~3 batches behind the host
        totals.add("3.unet", _FakeEvent(stream, 10.0 * i), _FakeEvent(stream, 10.0 * i + 3.0))
        assert totals.in_flight() <= 4
    assert totals.seconds() == {"3.unet": pytest.approx(3.0)}   # 1000 x 3 ms
    assert totals.in_flight() == 0
