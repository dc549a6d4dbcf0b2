"""The browser page at ``/`` in headless Chromium (Debian's ``/usr/bin/chromium`` driven by
Playwright): a real server on loopback (tiny config, CPU), a tone WAV played as the fake
microphone. Skipped when Chromium or Playwright is missing (``.ci/run`` installs both)."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_server import SAMPLE, running_server, sample_clip, upload, wait_prepared
from talkrt.media.frames import read_video_frames

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = os.environ.get("TALKRT_PAGE_SCREENSHOT")  # set to a path to keep a picture of the page

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-data")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def avatar(server, tmp_path_factory):
    r = upload(server, sample_clip(tmp_path_factory.mktemp("clip"), 0, 8, "a.mp4"))
    assert r.status_code == 202, r.text
    status = wait_prepared(server, r.json()["id"])
    assert status["status"] == "ready", status
    return status["id"]


def _tone_wav(path: Path, seconds: float = 3.0, rate: int = 16000) -> Path:
    """A 16 kHz mono s16le WAV: a 200-800 Hz chirp, loud enough to count as speech."""
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.5 * np.sin(2 * np.pi * (200 * t + 100 * t * t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((chirp * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def page(server, tmp_path):
    """A fresh headless Chromium profile whose fake microphone plays a tone WAV; yields
    (page, wav, errors) where errors collects uncaught page exceptions."""
    wav = _tone_wav(tmp_path / "tone.wav")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
                  "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server + "/")
            yield page, wav, errors
        finally:
            browser.close()


def _stats(page) -> dict:
    return page.evaluate("window.talkrtStats")


def _canvas(page) -> dict:
    """The canvas size and its mean brightness (0..255); the empty canvas is transparent black."""
    return page.evaluate("""() => {
        const c = document.getElementById('screen');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let sum = 0; for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i + 1] + d[i + 2];
        return {w: c.width, h: c.height, mean: sum / (d.length / 4) / 3};
    }""")


def test_microphone_session_draws_frames_and_schedules_audio(page, avatar):
    page, _, errors = page
    page.wait_for_selector(f"#avatar option[value='{avatar}']", state="attached", timeout=15_000)
    page.select_option("#avatar", avatar)
    page.click("#mic")
    page.wait_for_function("window.talkrtStats.state === 'live'", timeout=15_000)
    # Idle frames come at 25 fps; the tiny CPU model makes a few speech frames per second.
    page.wait_for_function("window.talkrtStats.framesDrawn >= 20 && window.talkrtStats.audioScheduled >= 20"
                           " && window.talkrtStats.speakingFrames >= 2", timeout=60_000, polling=200)
    stats, canvas = _stats(page), _canvas(page)
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT)
    page.click("#stop")
    page.wait_for_function("window.talkrtStats.state === 'idle'", timeout=10_000)
    assert errors == []
    assert stats["samplesSent"] > 0 and stats["fps"] > 0
    assert stats["latencyMs"] is not None and stats["latencyMs"] > 0
    assert canvas["w"] == 320 and canvas["h"] == 320 and canvas["mean"] > 20, canvas


def test_upload_on_the_page_then_play_a_wav(server, page, avatar, tmp_path):
    page, wav, errors = page
    still = tmp_path / "still.png"  # a still image: one frame to prepare
    Image.fromarray(read_video_frames(SAMPLE, 1 << 30)[40]).save(still)
    page.set_input_files("#upload", str(still))
    page.wait_for_function("document.getElementById('upload-status').textContent.endsWith(' ready')",
                           timeout=90_000, polling=200)
    new_id = page.input_value("#avatar")
    assert new_id != avatar and len(httpx.get(server + "/v1/avatars").json()["avatars"]) >= 2
    page.set_input_files("#wav", str(wav))
    page.wait_for_function("window.talkrtStats.speakingFrames >= 2 && window.talkrtStats.framesDrawn >= 10",
                           timeout=60_000, polling=200)
    stats = _stats(page)
    page.click("#interrupt")
    page.click("#stop")
    page.wait_for_function("window.talkrtStats.state === 'idle'", timeout=10_000)
    assert errors == []
    # The WAV is 16 kHz; the page decodes it to its AudioContext's rate and streams it in real time.
    assert 0 < stats["samplesSent"] and stats["audioScheduled"] >= stats["framesDrawn"] > 0
