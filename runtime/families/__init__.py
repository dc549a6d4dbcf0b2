"""Model families: what differs between lip-sync models behind one pipeline.

A family (``family:`` in a config; MuseTalk configs may leave it out) supplies

* its config type (:func:`load_family_config` reads ``family`` and hands the file to the
  family's loader),
* :meth:`ModelFamily.build_parts`: weights, engines or eager modules, the avatar preparer
  (face tracking, crops or alignment, per-frame model conditions, cached by content) and the
  audio features, as :class:`talkrt.pipeline.PipelineParts`,
* :attr:`ModelFamily.compose_modes`: the ``--compose`` modes it runs
  (:func:`talkrt.session.resolve_compose` refuses the others); ``gpu`` is the GPU media path
  (device NV12 frames from stage 1 to stage 6), the others keep host RGB frames,
* :meth:`ModelFamily.audio_stage` (stage 2) and :meth:`ModelFamily.model_stages` (stages 3-5:
  the generator, one UNet step or a denoising loop; the decode to faces, kept on the device for
  ``gpu``; the blend into ``batch.frames`` or ``batch.nv12``) for the compose mode the parts chose,
* :meth:`ModelFamily.chunk_frames`: output frames per batch,
* its engines for ``make engines`` and ``--backend``: :meth:`ModelFamily.engine_specs` (one
  :class:`talkrt.engines.specs.ModelSpec` per network), :attr:`ModelFamily.engine_models` (those
  built as engines), :attr:`ModelFamily.engine_backends` (the build backends it supports) and
  :meth:`ModelFamily.load_models` (the weights the build compiles),
* :attr:`ModelFamily.unsupported_options`: config keys (prefixes) of the shared ``pipeline``
  section it does not run, with why; a server refuses them as per-job options
  (:func:`talkrt.serve.job_inputs.allowed_options`),
* :attr:`ModelFamily.live`: whether ``talkrt serve`` runs live sessions on it (its shared
  scheduler batches frames under real-time deadlines) or jobs only (:mod:`talkrt.serve.app`).

The batch loop, the frame source (stage 1) and the encoder (stage 6) are the same for every
family (:func:`talkrt.pipeline.build_stages` picks the CPU or the GPU pair from
``parts.compose``). A new family is a new module registered in :data:`FAMILIES`; nothing else
changes.
"""

from __future__ import annotations

import importlib
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from talkrt.config import read_config_data
from talkrt.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from talkrt.media.audio import AudioClip
    from talkrt.pipeline import PipelineParts
    from talkrt.stages import Stage

# family name -> (module defining ``FAMILY``, a ModelFamily; "module:function" loading its config).
# The config loaders are apart so that reading a config does not import the models (nor torch).
FAMILIES = {
    "musetalk": ("talkrt.families.musetalk", "talkrt.config:load_config"),
    "latentsync16": ("talkrt.families.latentsync", "talkrt.models.latentsync.config:load_latentsync_config"),
}


class ModelFamily(Protocol):
    """One model family (see the module docstring)."""

    name: str
    live: bool      # True: the server runs live sessions on it (its renderer and scheduler); False: jobs only
    compose_modes: tuple[str, ...]      # values of --compose / pipeline.compose it runs, "auto" included
    engine_models: tuple[str, ...]      # engine_specs names built as engines (compiled / TensorRT)
    engine_backends: tuple[str, ...]    # build backends it supports, of "onnx", "tensorrt", "compiled"
    unsupported_options: tuple[tuple[str, str], ...]  # (config key prefix it does not run, why): refused per job

    def build_parts(self, cfg: Any, *, device: torch.device, dtype: torch.dtype, stream: torch.cuda.Stream | None,
                    weights_dir: str | None, backend: str | None, compose: str | None, cache_dir: Path,
                    engines_dir: str | Path | None, tracker: str, cuda_graphs: bool, warmup: str) -> PipelineParts:
        """Load weights (official layout under ``weights_dir``, else synthetic) and build everything
        a run needs. Raises TalkrtError / InputError for settings or files it cannot use."""

    def audio_stage(self, parts: PipelineParts, clip: AudioClip, fps: Fraction) -> Stage:
        """Stage 2: sets ``batch.audio`` [f, tokens, D] for the frames with a face."""

    def model_stages(self, parts: PipelineParts) -> tuple[Stage, Stage, Stage]:
        """Stages 3 (generate latents), 4 (decode to ``batch.faces``), 5 (blend into ``batch.frames``
        or ``batch.nv12``, as ``parts.compose`` says)."""

    def chunk_frames(self, cfg: Any) -> int:
        """Output frames per batch."""

    def engine_specs(self, cfg: Any, max_batch: int | None = None) -> dict[str, Any]:
        """Name -> :class:`talkrt.engines.specs.ModelSpec` of every network the build step knows;
        ``max_batch`` bounds the networks whose batch the run chooses (None: the config's default)."""

    def load_models(self, cfg: Any, weights_dir: str | None, device: torch.device, dtype: torch.dtype) -> Any:
        """The family's networks (official weights under ``weights_dir``, else synthetic) on ``device``
        in ``dtype``, with ``identity`` (a weights hash) and ``to(device, dtype)``: what
        ``ModelSpec.make_module`` takes."""


def _entry(name: str) -> tuple[str, str]:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}' (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def get_family(name: str) -> ModelFamily:
    """The family ``name`` (ConfigError for an unknown one); imports its models."""
    return importlib.import_module(_entry(name)[0]).FAMILY


def config_family(cfg: Any) -> str:
    """The family of a loaded config (MuseTalk's config type has no ``family`` field)."""
    return getattr(cfg, "family", "musetalk")


def load_family_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load a config of any family: ``family`` in the YAML (default ``musetalk``) picks the loader.

    Raises:
        ConfigError: unreadable file, unknown family, or a field the family's validation refuses.
    """
    _, data = read_config_data(name_or_path, overrides)
    name = data.get("family", "musetalk") if isinstance(data, dict) else "musetalk"
    module, function = _entry(str(name))[1].split(":")
    return getattr(importlib.import_module(module), function)(name_or_path, overrides)
