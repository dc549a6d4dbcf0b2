"""LatentSync 1.6 (ByteDance, 512x512 latent diffusion lip-sync) as a talkrt model family.

* :mod:`.config` - ``load_latentsync_config("latentsync16" | "latentsync16-tiny")``
* :mod:`.unet` - :class:`LatentSyncUNet` (upstream ``UNet3DConditionModel``, stage2_512)
* :mod:`.audio` - Whisper-tiny states and per-frame 50-token windows, seam-free
* :mod:`.generator` - :class:`LatentSyncGenerator`: prepare / DDIM loop with guidance and DeepCache / decode
* :mod:`.weights` - official layout loader and synthetic weights

The lower-face mask and the face alignment live in :mod:`talkrt.face.align_mask` and
:mod:`talkrt.face.align`.
"""

from talkrt.models.latentsync.audio import ClipStates, LatentSyncAudio, WhisperStates
from talkrt.models.latentsync.config import LatentSyncConfig, load_latentsync_config
from talkrt.models.latentsync.generator import (
    ChunkInputs,
    LatentSyncGenerator,
    make_scheduler,
)
from talkrt.models.latentsync.unet import LatentSyncUNet
from talkrt.models.latentsync.weights import (
    LatentSyncModels,
    build_synthetic,
    load_models,
    load_official,
)

__all__ = [
    "ChunkInputs", "ClipStates", "LatentSyncAudio", "LatentSyncConfig", "LatentSyncGenerator", "LatentSyncModels",
    "LatentSyncUNet", "WhisperStates", "build_synthetic", "load_latentsync_config", "load_models", "load_official",
    "make_scheduler",
]
