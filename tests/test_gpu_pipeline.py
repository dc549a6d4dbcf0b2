"""GPU media path: NVDEC decode, fused compose into NV12, NV12-only download to libx264 (GPU only)."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")
pytest.importorskip("PyNvVideoCodec")

from media_factory import make_audio  # noqa: E402

from talkrt.config import load_config  # noqa: E402
from talkrt.gpu_stages import GpuFrameSource  # noqa: E402
from talkrt.media.audio import load_audio  # noqa: E402
from talkrt.media.frames import iter_video_frames  # noqa: E402
from talkrt.media.probe import probe_output, probe_video  # noqa: E402
from talkrt.pipeline import run_pipeline  # noqa: E402
from talkrt.stages import FrameBatch  # noqa: E402
from talkrt.session import build_session  # noqa: E402

SAMPLE = Path(__file__).parent / "data" / "sample_avatar.mp4"
SPEECH = Path(__file__).parent / "data" / "sample_speech.wav"


def test_nvdec_frames_match_pyav():
    from talkrt import kernels
    info = probe_video(SAMPLE)
    source = GpuFrameSource(SAMPLE, info, num_out=info.num_frames, batch_size=8, max_cache_bytes=1 << 30,
                            device=torch.device("cuda"), stream=None)
    assert source.decode_path == "nvdec"
    batch = FrameBatch(index=0, out_index=np.arange(8), src_index=np.arange(8), avatars=(),
                       avatar_index=np.zeros(8, np.int64), found=np.zeros(8, bool))
    source(batch)
    rgb = kernels.nv12_to_rgb(batch.nv12, matrix="bt709", full_range=False)
    gpu = np.asarray(kernels.cupy_module().asnumpy(rgb))
    cpu = np.stack([f for _, f in zip(range(8), iter_video_frames(SAMPLE))])
    assert gpu.shape == cpu.shape
    # same bitstream, same YUV; only the YUV->RGB rounding/chroma upsampling differs (swscale vs kernel)
    assert np.abs(gpu.astype(int) - cpu).mean() < 2.0


def test_nvdec_pooled_session_decodes_like_a_fresh_one():
    """A session reopened on another file (reconfigure_decoder) after a partial read gives the
    frames a brand-new session gives, at another resolution too."""
    import PyNvVideoCodec as nvc
    from talkrt.media.nvcodec import NvdecReader
    other = Path(__file__).parent / "data" / "b20a_small_face_640x360.mp4"
    device = torch.device("cuda")

    def read(path, count):
        info = probe_video(path)
        reader = NvdecReader(path, device, None)
        out = torch.empty((count, info.height * 3 // 2, info.width), dtype=torch.uint8, device=device)
        got = reader.read_into(out)
        torch.cuda.synchronize()
        decoder = reader.decoder
        reader.close()
        return out[:got].cpu().numpy(), decoder

    first, d1 = read(SAMPLE, 5)                  # partial read, then back to the pool
    second, d2 = read(other, 12)                 # the pooled session, reopened on another size
    third, d3 = read(SAMPLE, 12)
    assert d2 is d1 and d3 is d1
    for path, got in ((other, second), (SAMPLE, third)):
        info = probe_video(path)
        fresh = nvc.SimpleDecoder(str(path), gpu_id=0, use_device_memory=True)
        want = np.stack([torch.from_dlpack(f).cpu().numpy() for f in fresh.get_batch_frames(12)])
        assert got.shape == (12, info.height * 3 // 2, info.width)
        assert np.array_equal(got, want)
    assert np.array_equal(first, third[:5])


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    cfg = load_config("tiny", ["pipeline.batch_size=8"])
    cache = tmp_path_factory.mktemp("cache")
    gpu = build_session(cfg, device="cuda", backend="eager", compose="gpu", cache_dir=cache)
    host = build_session(cfg, device="cuda", backend="eager", compose="numpy", cache_dir=cache)
    return gpu, host


def test_gpu_compose_path_matches_host_path_and_downloads_only_nv12(sessions, tmp_path):
    gpu, host = sessions
    info, clip = probe_video(SAMPLE), load_audio(SPEECH)
    out_gpu, out_host = tmp_path / "gpu.mp4", tmp_path / "host.mp4"
    rep_gpu = run_pipeline(gpu, SAMPLE, info, SPEECH, clip, out_gpu)
    run_pipeline(host, SAMPLE, info, SPEECH, clip, out_host)
    assert rep_gpu.decode_path == "nvdec" and rep_gpu.compose == "gpu"
    nv12_bytes = info.width * info.height * 3 // 2
    assert rep_gpu.frame_bytes_to_host == rep_gpu.frames * nv12_bytes      # NV12 only, once per frame
    a, b = probe_output(out_gpu), probe_output(out_host)
    assert (a.num_frames, a.width, a.height, a.fps) == (b.num_frames, b.width, b.height, b.fps)
    assert a.has_audio and abs(a.duration_s - clip.duration_s) <= 1 / float(info.fps)
    # Same model and masks. The host path adds a YUV->RGB->YUV round trip of the whole frame (8-bit
    # rounding, chroma re-subsampling: ~1-2 levels) and x264 then codes two slightly different
    # inputs at CRF 20, so whole-frame mean differences of ~2 levels are expected; 3 is the bound.
    diffs = [np.abs(x.astype(int) - y).mean() for x, y in zip(iter_video_frames(out_gpu), iter_video_frames(out_host))]
    assert max(diffs) < 3.0, diffs


def test_memory_stays_constant_with_length(sessions, tmp_path):
    gpu, _ = sessions
    info = probe_video(SAMPLE)
    peaks = []
    for seconds in (4.0, 40.0):
        audio = tmp_path / f"speech_{seconds}.wav"
        make_audio(audio, seconds, sample_rate=16000)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run_pipeline(gpu, SAMPLE, info, audio, load_audio(audio), tmp_path / f"out_{seconds}.mp4")
        peaks.append(torch.cuda.max_memory_allocated())
    # 10x longer output: only the Whisper states grow (tiny config: ~2.5 MB per 40 s); frames are in fixed rings
    assert peaks[1] <= peaks[0] * 1.10 + 8 * 2**20, peaks


def test_nvenc_probe_leaves_torch_streams_usable():
    """Regression: probing NVENC in-process left PyNvVideoCodec's own CUDA context current, and the
    next event recorded on a torch stream failed with 'invalid resource handle'."""
    from talkrt.media.nvcodec import nvenc_available, torch_cuda_context
    nvenc_available.cache_clear()
    before = torch_cuda_context(torch.device("cuda", 0))
    assert isinstance(nvenc_available(0), bool)
    stream = torch.cuda.Stream()
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    event.synchronize()
    assert torch_cuda_context(torch.device("cuda", 0)) == before


def test_overlapped_stages_with_gpu_events_run_on_the_gpu_path(tmp_path):
    """stage_sync=false (CUDA events per stage) on the full GPU path, as the benchmark runs it."""
    parts = build_session(load_config("tiny", ["pipeline.stage_sync=false"]), device="cuda", backend="eager",
                          compose="gpu", cache_dir=tmp_path / "cache")
    out = tmp_path / "events.mp4"
    report = run_pipeline(parts, SAMPLE, probe_video(SAMPLE), SPEECH, load_audio(SPEECH), out)
    assert report.gpu_stage_seconds and report.gpu_stage_seconds.get("3.unet", 0) > 0
    assert probe_output(out).num_frames == report.frames
    # the encoder thread's time splits into encode, idle and download wait, within the run's wall time
    waits = report.encode_waits
    assert set(waits) == {"producer_wait", "encoder_idle", "download_wait", "encode"}
    assert waits["encode"] > 0 and min(waits.values()) >= 0
    assert waits["encode"] + waits["encoder_idle"] + waits["download_wait"] <= report.seconds + 0.05


def test_gpu_sharpen_matches_the_host_path(tmp_path):
    """pipeline.sharpen on both stage sets: the GPU kernel and the CPU reference agree."""
    cfg = load_config("tiny", ["pipeline.batch_size=8", "pipeline.sharpen.enabled=true"])
    info, clip = probe_video(SAMPLE), load_audio(SPEECH)
    outs = {}
    for compose in ("gpu", "numpy"):
        parts = build_session(cfg, device="cuda", backend="eager", compose=compose, cache_dir=tmp_path / "cache")
        outs[compose] = tmp_path / f"{compose}.mp4"
        run_pipeline(parts, SAMPLE, info, SPEECH, clip, outs[compose])
    # the same bound as the unsharpened comparison above (8-bit YUV round trip, x264 at CRF 20)
    diffs = [np.abs(x.astype(int) - y).mean()
             for x, y in zip(iter_video_frames(outs["gpu"]), iter_video_frames(outs["numpy"]))]
    assert max(diffs) < 3.0, diffs


def test_gpu_batch_mixing_avatars_equals_one_batch_per_avatar(tmp_path):
    from fractions import Fraction

    from talkrt import kernels
    from talkrt.config import SharpenConfig
    from talkrt.gpu_stages import GpuComposeStage
    from talkrt.media.writer import Mp4Writer
    from benchmarks.sample import moving_face_frames
    from talkrt.stages import AudioWindows, UNetStage, VaeDecodeStage

    parts = build_session(load_config("tiny"), device="cuda", backend="eager", compose="gpu",
                          cache_dir=tmp_path / "cache")
    clip = moving_face_frames(size=256, seconds=0.4)
    avatars, nv12 = [], []
    for name, frames in (("a.mp4", clip), ("b.mp4", clip[::-1])):     # same size, other boxes per frame
        path = tmp_path / name
        with Mp4Writer(path, 256, 256, Fraction(25)) as writer:
            for frame in frames:
                writer.write_rgb(frame)
        avatars.append(parts.preparer(path, probe_video(path)))
        rgb = kernels.cupy_module().asarray(np.stack(list(iter_video_frames(path))))
        nv12.append(torch.as_tensor(kernels.rgb_to_nv12(rgb), device="cuda"))
    speech = load_audio(SPEECH)
    compose = GpuComposeStage(SharpenConfig(), parts.stream)        # one stage: masks of both avatars

    def run(batch, sources):
        with torch.cuda.stream(parts.stream):
            batch.nv12 = torch.stack([sources[int(a)][int(s)] for a, s in zip(batch.avatar_index, batch.src_index)])
            AudioWindows(parts.audio_features, speech, Fraction(25))(batch)
            UNetStage(parts.unet, parts.device, parts.dtype, parts.stream)(batch)
            VaeDecodeStage(parts.vae_decoder, parts.stream, on_device=True)(batch)
            compose(batch)
        parts.stream.synchronize()
        return batch.nv12.cpu().numpy()

    owner, src, out = np.array([0, 1, 1, 0, 1]), np.array([0, 9, 2, 7, 4]), np.array([3, 0, 5, 1, 8])
    mixed = run(FrameBatch(index=0, out_index=out, src_index=src, avatars=tuple(avatars), avatar_index=owner,
                           found=np.ones(len(owner), bool)), nv12)
    for a, avatar in enumerate(avatars):
        rows = np.flatnonzero(owner == a)
        alone = run(FrameBatch.of_avatar(0, out[rows], src[rows], avatar), [nv12[a]])
        # other batch sizes may pick other convolution algorithms: a level of rounding apart
        assert np.abs(mixed[rows].astype(int) - alone).max() <= 2
        original = nv12[a][torch.as_tensor(src[rows])].cpu().numpy()
        assert not np.array_equal(mixed[rows], original)
