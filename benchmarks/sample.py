"""Make the bundled demo sample (run once; the result is committed under ``tests/data/``).

* ``sample_avatar.mp4``: a real face photo shipped by scikit-image (``skimage.data.astronaut``,
  public domain, NASA) given gentle head motion (small sway, nod and zoom), 25 fps, 4 s.
* ``sample_speech.wav``: one short sentence rendered with espeak-ng (needs the espeak-ng
  binary, only for regenerating the sample).

    python -m benchmarks.sample --out tests/data
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

SENTENCE = "Hello. This is talk R T, a lip sync engine. The mouth follows the speech."
SIZE, FPS, SECONDS = 320, 25, 4


def moving_face_frames(size: int = SIZE, fps: int = FPS, seconds: float = SECONDS,
                       width: int | None = None, height: int | None = None) -> list[np.ndarray]:
    """Frames of the astronaut photo with gentle head motion; ``width``/``height`` default to ``size``.

    The face spans about half the frame height whatever the size.
    """
    from skimage import data
    photo = data.astronaut()                       # 512x512 RGB, face near (205, 115)
    centre = np.array([205.0, 125.0])
    width, height = width or size, height or size
    zoom = 1.6 * height / SIZE
    frames = []
    for i in range(int(fps * seconds)):
        t = i / fps
        angle = 2.5 * math.sin(2 * math.pi * 0.35 * t)                     # degrees of sway
        scale = zoom * (1.0 + 0.03 * math.sin(2 * math.pi * 0.2 * t))      # slow zoom
        shift = np.array([4.0 * math.sin(2 * math.pi * 0.3 * t), 3.0 * math.sin(2 * math.pi * 0.5 * t)])
        m = cv2.getRotationMatrix2D(tuple(centre + shift), angle, scale)
        m[:, 2] += np.array([width / 2, height / 2]) - (centre + shift)
        frames.append(cv2.warpAffine(photo, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return frames


def write_sample(out_dir: Path) -> None:
    from talkrt.media.writer import Mp4Writer
    out_dir.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(out_dir / "sample_avatar.mp4", SIZE, SIZE, Fraction(FPS), crf=23, preset="slow",
                   metadata={"comment": "talkrt sample: skimage astronaut photo (NASA, public domain), synthetic motion"}) as w:
        for frame in moving_face_frames():
            w.write_rgb(frame)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed to render the sample speech (apt-get install espeak-ng)")
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(out_dir / "sample_speech.wav"), SENTENCE], check=True)
    log.info("wrote %s", out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data", type=Path)
    write_sample(parser.parse_args().out)
