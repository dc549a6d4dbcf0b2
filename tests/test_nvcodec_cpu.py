"""The CPU-testable half of the NVENC path: an Annex-B H.264 elementary stream (as NVENC writes it,
no B-frames) remuxed with the audio into an MP4 without re-encoding."""
from fractions import Fraction

import av
import numpy as np
from media_factory import make_audio, pattern_frame

from talkrt.media.frames import iter_video_frames
from talkrt.media.nvcodec import remux_h264
from talkrt.media.probe import probe_output


def test_elementary_stream_remux_keeps_frames_and_adds_audio(tmp_path):
    h264, out, audio = tmp_path / "raw.h264", tmp_path / "out.mp4", tmp_path / "a.wav"
    make_audio(audio, 2.5, sample_rate=16000)
    source = [pattern_frame(i, 96, 64) for i in range(40)]
    with av.open(str(h264), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": "0", "preset": "ultrafast", "crf": "12"})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i, frame in enumerate(source):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))
    count = remux_h264(h264, out, Fraction(25), audio_path=audio, metadata={"talkrt_backend": "test"})
    info = probe_output(out)
    assert count == 40 and info.num_frames == 40 and info.fps == 25
    assert info.has_audio and abs(info.audio_duration_s - 40 / 25) < 1 / 25
    assert info.metadata["talkrt_backend"] == "test"
    decoded = list(iter_video_frames(out))
    assert all(np.abs(d.astype(int) - s).mean() < 4 for d, s in zip(decoded, source))
