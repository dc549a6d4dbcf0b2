"""Typed, frozen configuration loaded from ``configs/*.yaml`` and validated in one place.

``load_config("musetalk")`` reads the YAML shipped in ``talkrt.configs``; a path to any
YAML file of the same shape works too.  Overrides use dotted keys, e.g.
``["pipeline.batch_size=32", "pipeline.sharpen.enabled=true"]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from talkrt.errors import ConfigError

COMPOSE_MODES = ("auto", "gpu", "numpy", "reference")
BACKENDS = ("auto", "tensorrt", "compiled", "eager")
PRECISIONS = ("float16", "bfloat16", "float32")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int
    norm_num_groups: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    scaling_factor: float


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """The Whisper encoder's shape (every model family here uses Whisper-tiny's)."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int

    @property
    def hidden_states(self) -> int:
        """Whisper returns the embedding output plus one state per encoder layer."""
        return self.encoder_layers + 1


@dataclass(frozen=True)
class AudioConfig(WhisperEncoderConfig):
    pad_left_steps: int
    pad_right_steps: int
    window_steps: int

    @property
    def tokens_per_frame(self) -> int:
        """Audio tokens the UNet attends to per video frame (50 for Whisper-tiny)."""
        return self.window_steps * self.hidden_states


@dataclass(frozen=True)
class ModelConfig:
    crop_size: int
    unet: UNetConfig
    vae: VAEConfig
    audio: AudioConfig

    @property
    def latent_size(self) -> int:
        return self.crop_size // 2 ** (len(self.vae.block_out_channels) - 1)


@dataclass(frozen=True)
class SharpenConfig:
    enabled: bool = False
    amount: float = 1.2
    sigma: float = 1.0
    threshold: int = 5


@dataclass(frozen=True)
class EncoderConfig:
    codec: str = "libx264"
    preset: str = "veryfast"
    crf: int = 20
    workers: int = 1              # > 1: that many libx264 processes encode segments of the output at once
    segment_seconds: float = 2.0  # segment length (each starts with an IDR frame)
    threads: int = 0              # libx264 threads per encoder; 0: libx264's own choice (about 1.5 x cores)


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 16
    precision: str = "float16"
    compose: str = "auto"
    backend: str = "auto"
    extra_margin: int = 10
    crop_expand: float = 1.5
    upper_boundary_ratio: float = 0.5
    smooth_window: int = 5
    max_cycle_cache_bytes: int = 4_000_000_000
    weights_seed: int = 0
    stage_sync: bool = False     # True: sync the stream after each stage (exact per-stage wall times, less overlap)
    sharpen: SharpenConfig = field(default_factory=SharpenConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass(frozen=True)
class TalkrtConfig:
    name: str
    model: ModelConfig
    pipeline: PipelineConfig
    source: str = ""            # what `--config` was given (a shipped name or a .yaml path), for hints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_hash(self) -> str:
        """Hash of everything that changes model outputs (not batch size, encoder, ...)."""
        blob = json.dumps(dataclasses.asdict(self.model), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, converting lists to tuples, checking keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing key '{f.name}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint in (int, float, str):
        if isinstance(value, bool) or (hint is not str and not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return hint(value)
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover - programming error


def pipeline_checks(p: PipelineConfig) -> list[tuple[bool, str]]:
    """The ``pipeline`` section's constraints as (ok, message) pairs (shared by every model family)."""
    return [
        (p.batch_size >= 1, "pipeline.batch_size must be >= 1"),
        (p.precision in PRECISIONS, f"pipeline.precision must be one of {PRECISIONS}"),
        (p.compose in COMPOSE_MODES, f"pipeline.compose must be one of {COMPOSE_MODES}"),
        (not (p.compose == "reference" and p.sharpen.enabled),
         "pipeline.sharpen.enabled=true needs compose 'numpy' or 'gpu': 'reference' reproduces MuseTalk's "
         "post-processing, which does not sharpen"),
        (p.backend in BACKENDS, f"pipeline.backend must be one of {BACKENDS}"),
        (p.extra_margin >= 0, "pipeline.extra_margin must be >= 0"),
        (p.crop_expand >= 1.0, "pipeline.crop_expand must be >= 1"),
        (0.0 <= p.upper_boundary_ratio < 1.0, "pipeline.upper_boundary_ratio must be in [0, 1)"),
        (p.smooth_window >= 1 and p.smooth_window % 2 == 1, "pipeline.smooth_window must be odd and >= 1"),
        (p.max_cycle_cache_bytes > 0, "pipeline.max_cycle_cache_bytes must be > 0"),
        (p.sharpen.amount >= 0 and p.sharpen.sigma > 0 and 0 <= p.sharpen.threshold <= 255,
         "pipeline.sharpen needs amount >= 0, sigma > 0, 0 <= threshold <= 255"),
        (p.encoder.preset in X264_PRESETS or p.encoder.codec != "libx264",
         f"pipeline.encoder.preset must be one of {X264_PRESETS} for libx264"),
        (0 <= p.encoder.crf <= 51, "pipeline.encoder.crf must be in [0, 51]"),
        (p.encoder.workers >= 1 and p.encoder.segment_seconds > 0 and p.encoder.threads >= 0,
         "pipeline.encoder needs workers >= 1, segment_seconds > 0 and threads >= 0"),
    ]


def validate(cfg: TalkrtConfig) -> TalkrtConfig:
    """Check every cross-field constraint once; raise ConfigError naming the field."""
    m, p = cfg.model, cfg.pipeline
    u, v, a = m.unet, m.vae, m.audio
    checks = [
        (m.crop_size > 0 and m.crop_size % 2 ** (len(v.block_out_channels) - 1) == 0,
         "model.crop_size must be a positive multiple of the VAE downsampling factor"),
        (u.in_channels == 2 * v.latent_channels, "model.unet.in_channels must be 2 x vae.latent_channels"),
        (u.out_channels == v.latent_channels, "model.unet.out_channels must equal vae.latent_channels"),
        (len(u.down_block_types) == len(u.block_out_channels) == len(u.up_block_types),
         "model.unet block lists must have equal lengths"),
        (all(c % u.norm_num_groups == 0 for c in u.block_out_channels),
         "model.unet.block_out_channels must be divisible by norm_num_groups"),
        (all(c % v.norm_num_groups == 0 for c in v.block_out_channels),
         "model.vae.block_out_channels must be divisible by norm_num_groups"),
        (a.d_model % a.encoder_attention_heads == 0, "model.audio.d_model must be divisible by the head count"),
        (a.window_steps >= 1 and a.pad_left_steps >= 0 and a.pad_right_steps >= a.window_steps,
         "model.audio needs window_steps >= 1, pad_left_steps >= 0, pad_right_steps >= window_steps"),
        *pipeline_checks(p),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config '{cfg.source or cfg.name}': {message}")
    return cfg


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a config name shipped with talkrt (``musetalk``, ``tiny``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    shipped = resources.files("talkrt.configs") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(p.name[:-5] for p in resources.files("talkrt.configs").iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"unknown config '{name_or_path}'; shipped configs: {names}, or pass a .yaml path")
    return Path(str(shipped))


def read_config_data(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[Path, Any]:
    """The YAML mapping of a config (shipped name or path) with ``--set`` overrides applied."""
    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    if isinstance(data, dict) and "source" in data:
        raise ConfigError(f"{path.name}: 'source' is set by talkrt, not by the file")
    return path, data


def _typed(cls: type, path: Path, data: Any, name_or_path: str | Path) -> Any:
    return dataclasses.replace(_build(cls, data, str(path.name)), source=str(name_or_path))


def build_config(cls: type, name_or_path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a config into dataclass ``cls`` (which has a ``source`` field); the caller validates it."""
    path, data = read_config_data(name_or_path, overrides)
    return _typed(cls, path, data, name_or_path)


def load_config(name_or_path: str | Path = "musetalk", overrides: list[str] | None = None) -> TalkrtConfig:
    """Load, override and validate a MuseTalk config."""
    path, data = read_config_data(name_or_path, overrides)
    family = data.get("family", "musetalk") if isinstance(data, dict) else "musetalk"
    if family != "musetalk":
        raise ConfigError(f"config '{name_or_path}' is a '{family}' model config; this command runs MuseTalk "
                          f"configs only (musetalk, tiny or a YAML of that family); run_pipeline runs it "
                          f"(python -m talkrt.cli --config {name_or_path} ...)")
    return validate(_typed(TalkrtConfig, path, data, name_or_path))
