"""Media I/O for talkrt: probing and decoding inputs, loading audio, writing the MP4 output.

All of it uses PyAV (no ffmpeg executable).  Frames are numpy ``uint8`` RGB ``[H, W, 3]``.
"""

from .audio import AudioClip, load_audio
from .frames import iter_video_frames, read_video_frames
from .probe import OutputInfo, VideoInfo, probe_output, probe_video
from .writer import Mp4Writer

__all__ = [
    "AudioClip",
    "Mp4Writer",
    "OutputInfo",
    "VideoInfo",
    "iter_video_frames",
    "load_audio",
    "probe_output",
    "probe_video",
    "read_video_frames",
]
