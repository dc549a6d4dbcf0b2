"""Load LatentSync 1.6 checkpoints in their official layout, or build synthetic weights.

Official layout under ``--weights DIR`` (what LatentSync's download script produces, plus the
VAE it fetches from ``stabilityai/sd-vae-ft-mse``)::

    DIR/latentsync_unet.pt        {"global_step": int, "state_dict": UNet state dict}
    DIR/whisper/tiny.pt           OpenAI Whisper checkpoint (converted to transformers at load)
    DIR/sd-vae/config.json        diffusers AutoencoderKL folder (sd-vae-ft-mse)
    DIR/sd-vae/diffusion_pytorch_model.safetensors   (or .bin)
    DIR/mask.png                  optional: upstream's latentsync/utils/mask.png

Without ``--weights`` talkrt builds SYNTHETIC weights of the true architecture (fixed seed):
right shapes and speed, not lip-synced, labelled ``synthetic`` as MuseTalk's are.
Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from talkrt.errors import InputError
from talkrt.face.align_mask import FaceMask, load_mask, mask_file
from talkrt.models.audio import whisper_config
from talkrt.models.latentsync.audio import WhisperStates
from talkrt.models.latentsync.config import LatentSyncConfig
from talkrt.models.latentsync.unet import LatentSyncUNet
from talkrt.models.latentsync.whisper_openai import encoder_from_openai, save_openai
from talkrt.models.vae import VaeDecoder, VaeEncoder, build_vae, vae_diffusers_config
from talkrt.models.weights import (
    VAE_DIR,
    _first_existing,
    _from_pretrained,
    _load_state,
    _read_checkpoint,
    _require,
    _weights_fingerprint,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

log = logging.getLogger(__name__)

UNET_FILE, WHISPER_FILE = "latentsync_unet.pt", "whisper/tiny.pt"
VAE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Deterministic buffers that a checkpoint may omit (they are rebuilt from the config).
OPTIONAL_SUFFIXES = ("pos_encoder.pe",)


@dataclass
class LatentSyncModels:
    """The networks and the mask of the LatentSync family, ready for inference."""

    unet: LatentSyncUNet
    vae_encoder: VaeEncoder
    vae_decoder: VaeDecoder
    whisper: WhisperStates
    mask: FaceMask       # the lower-face mask at the crop size (``mask.keep``: 1 = keep)
    source: str          # "official" or "synthetic"
    identity: str        # short hash identifying the weights (part of cache keys)

    def to(self, device: torch.device, dtype: torch.dtype) -> LatentSyncModels:
        for net in (self.unet, self.vae_encoder, self.vae_decoder, self.whisper):
            net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self


def load_unet_state(unet: LatentSyncUNet, path: Path) -> int:
    """Load ``latentsync_unet.pt`` into ``unet`` strictly; return its ``global_step``.

    Every parameter and buffer must be present with its shape, except the temporal position
    tables, which are deterministic and rebuilt from the config when absent. Raises InputError
    naming ``path``.
    """
    ckpt = _read_checkpoint(path, "UNet checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise InputError(path, "not a LatentSync UNet checkpoint (expected a dict with 'state_dict')")
    state = dict(ckpt["state_dict"])
    own = unet.state_dict()
    for key in own:
        if key.endswith(OPTIONAL_SUFFIXES) and key not in state:
            state[key] = own[key]
    _load_state(unet, state, path, "the LatentSync 1.6 UNet of this config")
    return int(ckpt.get("global_step", 0))


def build_synthetic(cfg: LatentSyncConfig, seed: int | None = None) -> LatentSyncModels:
    """Random weights of the configured architecture from a fixed seed (NOT lip-synced)."""
    seed = cfg.pipeline.weights_seed if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = LatentSyncUNet(cfg.model)
        vae = build_vae(vae_diffusers_config(cfg.model))
        encoder = WhisperEncoder(whisper_config(cfg.model.audio))
    log.warning("SYNTHETIC WEIGHTS (seed %d, config '%s'): the output will NOT be lip-synced. "
                "Pass --weights DIR with the official LatentSync 1.6 checkpoints for real results.", seed, cfg.name)
    return LatentSyncModels(unet, VaeEncoder(vae), VaeDecoder(vae), WhisperStates(encoder),
                            load_mask(None, cfg.model.crop_size), "synthetic", f"synthetic-{cfg.model_hash()}-{seed}")


def load_official(cfg: LatentSyncConfig, weights_dir: str | Path) -> LatentSyncModels:
    """Load LatentSync 1.6 from the official folder layout (see module docstring)."""
    root = _require(Path(weights_dir), "weights folder")
    unet_path = _require(root / UNET_FILE, "UNet checkpoint")
    whisper_path = _require(root / WHISPER_FILE, "Whisper checkpoint")
    vae_dir = _require(root / VAE_DIR, "VAE folder")
    _require(vae_dir / "config.json", "VAE config")
    vae_file = _first_existing(vae_dir, VAE_FILES)
    mask_path = mask_file(root)
    mask = load_mask(mask_path, cfg.model.crop_size)       # a bad mask.png is refused before the networks load
    unet = LatentSyncUNet(cfg.model)
    step = load_unet_state(unet, unet_path)
    encoder = encoder_from_openai(whisper_path, cfg.model.audio)
    # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate`, minus its warning
    vae = _from_pretrained(AutoencoderKL, vae_dir, "VAE folder", low_cpu_mem_usage=False)
    want = vae_diffusers_config(cfg.model)
    for key in ("block_out_channels", "latent_channels", "layers_per_block"):
        got = vae.config.get(key)
        if (list(got) if isinstance(got, (list, tuple)) else got) != want[key]:
            raise InputError(vae_dir, f"VAE {key} is {got}; the config's sd-vae-ft-mse shape needs {want[key]}")
    # LatentSync sets these regardless of the folder (scripts/inference.py)
    vae.register_to_config(scaling_factor=cfg.model.vae.scaling_factor, shift_factor=0.0)
    if mask_path is None:
        log.info("no mask.png in %s: using talkrt's procedural drawing of LatentSync's mask", root)
    files = [unet_path, whisper_path, vae_file] + ([mask_path] if mask_path else [])
    log.info("loaded official LatentSync 1.6 weights from %s (UNet global_step %d)", root, step)
    return LatentSyncModels(unet, VaeEncoder(vae), VaeDecoder(vae), WhisperStates(encoder), mask,
                            "official", f"official-{_weights_fingerprint(files)}")


def load_models(cfg: LatentSyncConfig, weights_dir: str | Path | None, device: torch.device,
                dtype: torch.dtype) -> LatentSyncModels:
    models = load_official(cfg, weights_dir) if weights_dir else build_synthetic(cfg)
    return models.to(device, dtype)


def save_official_layout(models: LatentSyncModels, cfg: LatentSyncConfig, root: str | Path,
                         global_step: int = 0) -> Path:
    """Write ``models`` in the official layout (tests and sample checkpoints); the mask is not written."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": global_step, "state_dict": models.unet.state_dict()}, root / UNET_FILE)
    save_openai(models.whisper.encoder, cfg.model.audio, root / WHISPER_FILE)
    vae = build_vae(vae_diffusers_config(cfg.model))
    vae.encoder, vae.quant_conv = models.vae_encoder.encoder, models.vae_encoder.quant_conv
    vae.decoder, vae.post_quant_conv = models.vae_decoder.decoder, models.vae_decoder.post_quant_conv
    vae.save_pretrained(root / VAE_DIR)
    return root
