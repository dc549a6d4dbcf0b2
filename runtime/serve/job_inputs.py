"""What a job may ask for and how its inputs are checked: the per-job options, the job's config,
and the CLI's own input checks (:func:`talkrt.cli.check_inputs`) with messages that name the
client's files, never the server's paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from talkrt.cli import check_inputs, frame_rate
from talkrt.config import TalkrtConfig, pipeline_checks
from talkrt.errors import InputError, TalkrtError
from talkrt.media.audio import AudioClip
from talkrt.media.probe import MAX_FPS, VideoInfo

#: the longest ``options`` text accepted (characters)
MAX_OPTIONS_CHARS = 16_384
#: the shortest per-job encoder segment (seconds): shorter ones only multiply processes and files
MIN_SEGMENT_SECONDS = 0.5

#: config keys a job may set (``--set`` overrides that change neither the models nor the batch
#: shape the shared engines were built for), less those the server's family does not run
#: (:func:`allowed_options`)
SAFE_OPTIONS = (
    "pipeline.encoder.preset", "pipeline.encoder.crf", "pipeline.encoder.workers", "pipeline.encoder.segment_seconds",
    "pipeline.sharpen.enabled", "pipeline.sharpen.amount", "pipeline.sharpen.sigma", "pipeline.sharpen.threshold",
)


class ApiError(Exception):
    """An HTTP error of the job API: ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class JobOptions:
    """A job's options: config values (``(key, value)``; :func:`job_config` checks the keys) and
    the output frame rate (None: the video's)."""

    values: tuple[tuple[str, Any], ...] = ()
    fps: str | None = None

    @property
    def overrides(self) -> tuple[str, ...]:
        """The values as ``--set`` overrides (``KEY=VALUE``, the value as JSON, which YAML reads)."""
        return tuple(f"{key}={json.dumps(value)}" for key, value in self.values)


def parse_options(text: str | None) -> JobOptions:
    """The ``options`` field: a JSON object ``{"pipeline.encoder.crf": 23, "fps": "25", ...}``.

    Raises:
        ApiError: 422 ``bad_options`` naming the key and the problem.
    """
    if not text:
        return JobOptions()
    if len(text) > MAX_OPTIONS_CHARS:
        raise ApiError(422, "bad_options", f"options has {len(text)} characters, at most {MAX_OPTIONS_CHARS}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "bad_options", f"options is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ApiError(422, "bad_options", "options is nested too deeply (a flat JSON object is expected)") from None
    if not isinstance(data, dict):
        raise ApiError(422, "bad_options", "options must be a JSON object of KEY: value")
    fps = data.pop("fps", None)
    if fps is not None:
        try:
            rate = frame_rate(str(fps))
        except argparse.ArgumentTypeError as exc:
            raise ApiError(422, "bad_options", f"options.fps: {exc}") from None
        if rate > MAX_FPS:
            raise ApiError(422, "bad_options", f"options.fps: frame rate {fps} is out of range "
                                               f"(0 < fps <= {MAX_FPS})")
    return JobOptions(tuple(data.items()), None if fps is None else str(fps))


def allowed_options(server_cfg: Any) -> tuple[str, ...]:
    """The keys of :data:`SAFE_OPTIONS` a job may set on a server of this config's family: all but
    those under a prefix of the family's ``unsupported_options``
    (:class:`~talkrt.families.ModelFamily`; LatentSync: ``pipeline.sharpen``)."""
    return tuple(key for key in SAFE_OPTIONS if _unsupported(server_cfg, key) is None)


def _unsupported(server_cfg: Any, key: str) -> str | None:
    """Why the config's family does not take ``key`` (None: it does)."""
    from talkrt.families import config_family, get_family
    family = get_family(config_family(server_cfg))
    for prefix, reason in family.unsupported_options:
        if key == prefix or key.startswith(prefix + "."):
            return f"not settable on a {family.name} server ({reason})"
    return None


def job_config(server_cfg: TalkrtConfig, values: tuple[tuple[str, Any], ...]) -> TalkrtConfig:
    """The server's config (of any model family) with a job's values set (each of the field's own
    type; the keys those :func:`allowed_options` allows) and the pipeline's rules checked.

    Raises:
        ApiError: 422 ``bad_options`` naming the key, or the rule the config breaks.
    """
    for key, _ in values:
        if key not in SAFE_OPTIONS or (why := _unsupported(server_cfg, key)) is not None:
            problem = "not settable per job" if key not in SAFE_OPTIONS else why
            raise ApiError(422, "bad_options", f"options.{key}: {problem}; allowed: fps, "
                                               f"{', '.join(allowed_options(server_cfg))}")
    cfg = server_cfg
    for key, value in values:
        cfg = _set(cfg, key.split("."), value, key)
    # a job sets pipeline keys only (SAFE_OPTIONS): the model section is the server's, validated at
    # load, and the pipeline's rules are every family's (a family's own refusals: check_job)
    for ok, message in pipeline_checks(cfg.pipeline):
        if not ok:
            raise ApiError(422, "bad_options", f"config '{cfg.source or cfg.name}': {message}")
    # one job must not take the host: each encoder worker is a process of its own
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    enc = cfg.pipeline.encoder
    if enc.workers > max(cores, server_cfg.pipeline.encoder.workers):
        raise ApiError(422, "bad_options", f"options.pipeline.encoder.workers: {enc.workers} encoder processes, at "
                                           f"most {max(cores, server_cfg.pipeline.encoder.workers)} on this server")
    if enc.workers > 1 and enc.segment_seconds < min(MIN_SEGMENT_SECONDS, server_cfg.pipeline.encoder.segment_seconds):
        raise ApiError(422, "bad_options", f"options.pipeline.encoder.segment_seconds: {enc.segment_seconds} s, at "
                                           f"least {MIN_SEGMENT_SECONDS} s per segment")
    return cfg


def _set(node: Any, keys: list[str], value: Any, key: str) -> Any:
    if len(keys) > 1:
        return dataclasses.replace(node, **{keys[0]: _set(getattr(node, keys[0]), keys[1:], value, key)})
    kind = type(getattr(node, keys[0]))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), str: isinstance(value, str), float: number,
          int: number and float(value).is_integer()}[kind]
    if not ok:
        raise ApiError(422, "bad_options", f"options.{key}: expected {kind.__name__}, got {value!r}")
    return dataclasses.replace(node, **{keys[0]: kind(value)})


@dataclass(frozen=True)
class CheckedInputs:
    """A job's inputs as the pipeline takes them."""

    video: Path
    audio: Path
    out: Path
    info: VideoInfo
    clip: AudioClip

    @property
    def frames(self) -> int:
        """Output frames (the audio's length at the video's rate)."""
        from talkrt.media.audio import num_video_frames
        return num_video_frames(len(self.clip.samples), self.info.fps, self.clip.sample_rate)


def check_job(video: Path, video_name: str, audio: Path, audio_name: str, out: Path, *, config: str,
              overrides: tuple[str, ...], fps: str | None, device: str, cache_dir: Path,
              max_duration_s: float | None = None) -> CheckedInputs:
    """Run the CLI's input checks (probe, audio decode, audio at least one frame, output folder,
    free space, cache folder) on a job's files; messages name ``video_name``/``audio_name``.

    Raises:
        ApiError: 422 ``bad_media`` with the probe's message for an input the pipeline cannot
            take, 422 ``too_long`` over ``max_duration_s``, 507 ``storage`` when the server's
            own folders cannot take the output.
    """
    args = argparse.Namespace(video=str(video), audio=str(audio), out=str(out), config=config, device=device,
                              fps=None if fps is None else Fraction(fps), json=None, cache_dir=str(cache_dir),
                              compose=None, backend=None, weights=None)
    names = {str(video): video_name, str(audio): audio_name}
    try:
        v, a, o, info, clip = check_inputs(args, list(overrides))
    except InputError as exc:
        if exc.path in names:
            raise ApiError(422, "bad_media", f"{names[exc.path]}: {exc.problem}") from None
        raise ApiError(507, "storage", f"the server cannot store the result: {exc.problem}") from None
    except TalkrtError as exc:
        raise ApiError(422, "bad_options", str(exc)) from None
    if max_duration_s is not None:
        for name, seconds in ((video_name, info.duration_s), (audio_name, clip.duration_s)):
            if seconds > max_duration_s:
                raise ApiError(422, "too_long", f"{name}: {seconds:.1f} s is longer than this server takes "
                                                f"({max_duration_s:g} s)")
    return CheckedInputs(v, a, o, info, clip)


def display_error(exc: BaseException, names: dict[str, str]) -> dict[str, str]:
    """A failed job's ``error`` object: an input problem names the client's file, other talkrt
    errors keep their message, anything else says what it was."""
    if isinstance(exc, ApiError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, InputError):
        where = names.get(exc.path or "")
        return {"code": "bad_media", "message": f"{where}: {exc.problem}" if where else exc.problem}
    if isinstance(exc, TalkrtError):
        return {"code": getattr(exc, "code", "failed"), "message": str(exc)}
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
