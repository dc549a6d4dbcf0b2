"""LatentSync 1.6 on the GPU media path (GPU only): NVDEC NV12 frames, the restore into NV12 on the
device, the NV12 download to libx264, against the CPU restore of the same run (``compose=numpy``)."""
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

from talkrt.families import load_family_config  # noqa: E402
from talkrt.kernels import reference as kernels  # noqa: E402
from talkrt.media.audio import load_audio  # noqa: E402
from talkrt.media.frames import iter_video_frames  # noqa: E402
from talkrt.media.probe import probe_output, probe_video  # noqa: E402
from talkrt.pipeline import ping_pong_index, run_pipeline  # noqa: E402
from talkrt.session import build_session  # noqa: E402

SAMPLE = Path(__file__).parent / "data" / "sample_avatar.mp4"   # 100 frames, 320x320, BT.709 limited
SECONDS = 4.4          # 110 output frames: 7 chunks (the last of 14) and the ping-pong cycle past frame 99


def test_gpu_restore_path_matches_the_cpu_restore(tmp_path):
    # 3 DDIM steps instead of 20 keep it short; DeepCache and guidance stay on
    cfg = load_family_config("latentsync16-tiny", ["model.denoise.steps=3"])
    cache = tmp_path / "cache"
    gpu = build_session(cfg, device="cuda", compose="gpu", cache_dir=cache)
    host = build_session(cfg, device="cuda", compose="numpy", cache_dir=cache)
    assert (gpu.compose, host.compose) == ("gpu", "numpy")
    audio = tmp_path / "speech.wav"
    make_audio(audio, SECONDS, sample_rate=16000)
    info, clip = probe_video(SAMPLE), load_audio(audio)
    out_gpu, out_host = tmp_path / "gpu.mp4", tmp_path / "host.mp4"
    rep = run_pipeline(gpu, SAMPLE, info, audio, clip, out_gpu)
    run_pipeline(host, SAMPLE, info, audio, clip, out_host)

    n = round(SECONDS * 25)
    assert rep.frames == n and rep.faces_found == n and rep.compose == "gpu"
    assert rep.decode_path == "nvdec"
    nv12_bytes = info.width * info.height * 3 // 2
    expected_download = 0 if rep.encode_path == "nvenc" else n * nv12_bytes    # NV12 only, once per frame
    assert rep.frame_bytes_to_host == expected_download, rep.encode_path
    a, b = probe_output(out_gpu), probe_output(out_host)
    assert (a.num_frames, a.width, a.height, a.fps) == (n, info.width, info.height, info.fps)
    assert (b.num_frames, b.width, b.height, b.fps) == (a.num_frames, a.width, a.height, a.fps)
    assert a.has_audio and a.metadata["talkrt_compose"] == "gpu"

    # Same generator on the same device, so the same faces; the restore kernel equals the CPU
    # reference bit for bit on the same inputs. What differs is the frame representation: the CPU
    # path decodes to RGB, restores in RGB and converts back to YUV (8-bit rounding and chroma
    # re-subsampling of the whole frame), the GPU path restores into the decoded NV12 (chroma by
    # compose_nv12's rule); libx264 (CRF 20) then codes two slightly different inputs. Emulated on
    # the CPU (the numpy run's faces through warp_reference.restore_nv12 into PyAV's NV12 and the
    # same writer), these clips differ by 1.9-2.4 levels per frame (whole-frame mean) and 3.1 at
    # most inside the generated region: bounds 3 (as MuseTalk's GPU test) and 4.5.
    avatar = gpu.preparer(SAMPLE, info)              # the cached avatar both runs used
    paste = gpu.models.mask.paste
    src = ping_pong_index(np.arange(n), avatar.num_frames)
    source = list(iter_video_frames(SAMPLE))
    whole, inside, changed = [], [], []
    for i, (x, y) in enumerate(zip(iter_video_frames(out_gpu), iter_video_frames(out_host))):
        diff = np.abs(x.astype(int) - y)
        whole.append(diff.mean())
        region = np.zeros((1, info.height, info.width, 3), np.uint8)   # where the restore writes
        size = paste.shape[0]
        kernels.restore_rgb(region, np.full((1, size, size, 3), 255, np.uint8), avatar.to_crop[src[i]][None], paste)
        face = region[0, :, :, 0] > 0
        inside.append(diff.mean(axis=2)[face].mean())
        changed.append(np.abs(x.astype(int) - source[src[i]]).mean(axis=2)[region[0, :, :, 0] > 200].mean())
    assert len(whole) == n
    assert max(whole) < 3.0, whole
    assert max(inside) < 4.5, inside
    assert min(changed) > 10, changed       # synthetic weights: the GPU restore did replace the mouth region
