"""LatentSync 1.6's generator: aligned faces + mask + audio tokens -> lip-synced faces.

Per chunk of ``f`` frames (16; upstream ``LipsyncPipeline.__call__``):

1. ``encode_condition`` (depends only on the aligned face, so it can be cached per avatar
   frame): pixels ``x / 127.5 - 1``; the masked image is ``pixels * mask`` (the generated
   region becomes 0); the VAE encodes the masked image and the unmasked reference (the same
   frames) to scaled latents (the posterior mean, as :class:`talkrt.models.vae.VaeEncoder`
   takes it; upstream samples the posterior); the mask is resized to the latent grid
   (nearest, as :meth:`talkrt.face.align_mask.FaceMask.latent`). Condition channels:
   ``[mask 1, masked latent 4, reference latent 4]``. ``chunk`` lays a chunk's conditions and
   audio out for the loop; ``prepare`` does both.
2. ``denoise``: DDIM (``DDIMScheduler``: 1000 training steps, scaled-linear betas
   0.00085-0.012, ``steps_offset`` 1, ``set_alpha_to_one`` false, eta 0; upstream
   ``configs/scheduler_config.json``) for ``steps`` steps from one Gaussian draw of shape
   ``[1, 4, 1, h, w]`` shared by every frame (drawn once per generator from ``noise_seed``, so
   every chunk starts from the same noise, as upstream's single draw for the whole video).
   Each step runs the UNet on ``[latents 4, condition 9]``; with guidance > 1 the batch is
   ``[zero audio, audio]`` and ``eps = eps_u + g (eps_a - eps_u)``. With DeepCache, steps
   ``j % interval != 0`` run :meth:`LatentSyncUNet.forward_shallow` on the deep features of
   the last full step.
3. ``decode``: the VAE decodes the latents; given the chunk's faces, the input pixels are
   pasted back outside the generated region (``out = decoded (1 - mask) + input mask``, upstream's
   in-crop paste), else the raw decoded faces are returned for a blend that takes the kept region
   from the frame; rounded to uint8 (upstream truncates; rounding removes its -0.5 bias).

``full`` and ``shallow`` are the ``forward_full`` / ``forward_shallow`` of the ``unet`` given, chosen
once at construction: the module itself (eager) or
:class:`talkrt.families.latentsync_engines.CompiledUNetSteps` (compiled engines, same signatures),
so the loop never branches on the backend. ``vae_encoder`` / ``vae_decoder`` are likewise the
modules or engine calls of the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from talkrt.models.latentsync.config import DenoiseConfig, LatentSyncModelConfig
from talkrt.models.latentsync.unet import LatentSyncUNet
from talkrt.models.vae import VaeDecoder, VaeEncoder

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1}


def make_scheduler(steps: int) -> DDIMScheduler:
    """Upstream's DDIM scheduler with ``steps`` inference timesteps set (``[951, 901, ..., 1]`` for 20)."""
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass
class ChunkInputs:
    """What :meth:`LatentSyncGenerator.prepare` computes once per chunk (all on the model device)."""

    frames: int
    condition: torch.Tensor        # [b, 9, f, h, w] mask / masked / reference latents (b = 2 with guidance)
    context: torch.Tensor          # [b * f, T, D] audio tokens ([zeros, audio] with guidance)
    pixels: torch.Tensor | None    # [f, S, S, 3] float32 input faces in [0, 255], for the paste-back
    keep: torch.Tensor | None      # [f, S, S, 1] float32 mask, 1 = keep the input pixel


class LatentSyncGenerator:
    """``generator(faces [f,3,S,S] uint8 or float in [0,255], masks, audio [f,T,D]) -> [f,S,S,3] uint8``.

    ``masks``: ``[S,S]``, ``[1,S,S]`` or ``[f,1,S,S]`` floats in [0, 1] (1 = keep), e.g.
    ``models.mask.keep``. ``f`` is at most the UNet's ``motion_max_frames`` (chunks are 16 frames).
    Raises ValueError on inputs of the wrong shape.
    """

    def __init__(self, unet: LatentSyncUNet, vae_encoder: VaeEncoder, vae_decoder: VaeDecoder,
                 model: LatentSyncModelConfig, device: torch.device, dtype: torch.dtype,
                 denoise: DenoiseConfig | None = None):
        self.unet, self.vae_encoder, self.vae_decoder = unet, vae_encoder, vae_decoder
        self.model, self.device, self.dtype = model, device, dtype
        self.cfg = denoise or model.denoise
        self.scheduler = make_scheduler(self.cfg.steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.guided = self.cfg.guidance_scale > 1.0
        h = model.latent_size
        gen = torch.Generator().manual_seed(self.cfg.noise_seed)
        noise = torch.randn((1, model.vae.latent_channels, 1, h, h), generator=gen)
        self.noise = (noise * self.scheduler.init_noise_sigma).to(device, dtype)
        self.full = unet.forward_full
        self.shallow = unet.forward_shallow

    def cached_step(self, j: int) -> bool:
        """Whether step ``j`` reuses deep features (DeepCache: all but every ``interval``-th step)."""
        return self.cfg.deepcache and j % self.cfg.deepcache_interval != 0

    def _faces_and_keep(self, faces, masks) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.model.crop_size
        faces = torch.as_tensor(faces, device=self.device)
        if faces.dim() != 4 or tuple(faces.shape[1:]) != (3, s, s):
            raise ValueError(f"faces must be [f, 3, {s}, {s}], got {tuple(faces.shape)}")
        f = faces.shape[0]
        keep = torch.as_tensor(np.array(masks) if isinstance(masks, np.ndarray) else masks,   # may be read-only
                               device=self.device, dtype=torch.float32)
        keep = keep.reshape(-1, 1, s, s) if keep.numel() % (s * s) == 0 else keep
        if keep.dim() != 4 or keep.shape[0] not in (1, f):
            raise ValueError(f"masks must be [{s}, {s}], [1, {s}, {s}] or [{f}, 1, {s}, {s}], got {tuple(masks.shape)}")
        return faces, keep.expand(f, 1, s, s)

    @torch.inference_mode()
    def encode_condition(self, faces: torch.Tensor, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Per-frame condition ``[f, 9, h, w]`` (mask, masked latent, reference latent) in the model
        dtype: it depends only on the aligned face, so it can be cached per avatar frame."""
        faces, keep = self._faces_and_keep(faces, masks)
        x = (faces.float() / 127.5 - 1.0).to(self.dtype)
        f, h = faces.shape[0], self.model.latent_size
        latents = self.vae_encoder(torch.cat([x * keep.to(self.dtype), x]))       # [2f, 4, h, w]
        mask_lat = F.interpolate(keep, size=(h, h), mode="nearest").to(self.dtype)
        return torch.cat([mask_lat, latents[:f], latents[f:]], dim=1)

    def chunk(self, condition: torch.Tensor, audio: torch.Tensor, faces: torch.Tensor | None = None,
              masks: torch.Tensor | np.ndarray | None = None) -> ChunkInputs:
        """Lay one chunk out for the loop: ``condition [f, 9, h, w]`` (:meth:`encode_condition`),
        ``audio [f, T, D]``; ``faces`` and ``masks`` only for :meth:`decode`'s paste-back."""
        f, a = condition.shape[0], self.model.audio
        if tuple(audio.shape) != (f, a.tokens_per_frame, a.d_model):
            raise ValueError(f"audio must be [{f}, {a.tokens_per_frame}, {a.d_model}], got {tuple(audio.shape)}")
        cond = condition.to(self.device, self.dtype).transpose(0, 1)[None]       # [1, 9, f, h, w]
        audio = audio.to(self.device, self.dtype)
        if self.guided:
            cond = torch.cat([cond, cond])
            audio = torch.cat([torch.zeros_like(audio), audio])
        pixels = keep = None
        if faces is not None:
            faces, keep = self._faces_and_keep(faces, masks)
            pixels, keep = faces.float().permute(0, 2, 3, 1), keep.permute(0, 2, 3, 1)
        return ChunkInputs(f, cond, audio, pixels, keep)

    def prepare(self, faces: torch.Tensor, masks: torch.Tensor | np.ndarray, audio: torch.Tensor) -> ChunkInputs:
        """:meth:`encode_condition` then :meth:`chunk`, keeping the faces for the paste-back."""
        return self.chunk(self.encode_condition(faces, masks), audio, faces, masks)

    def unet_step(self, latents: torch.Tensor, j: int, chunk: ChunkInputs,
                  deep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Denoising step ``j``: ``latents [1, 4, f, h, w] -> (next latents, deep features)``."""
        t = torch.tensor(self.timesteps[j], device=self.device)
        x = torch.cat([latents, latents]) if self.guided else latents
        x = torch.cat([x, chunk.condition], dim=1)
        if deep is not None and self.cached_step(j):
            eps = self.shallow(x, t, chunk.context, deep)
        else:
            eps, deep = self.full(x, t, chunk.context)
        if self.guided:
            uncond, cond = eps.chunk(2)
            eps = uncond + self.cfg.guidance_scale * (cond - uncond)
        return self.scheduler.step(eps, self.timesteps[j], latents, eta=0.0).prev_sample, deep

    @torch.inference_mode()
    def denoise(self, chunk: ChunkInputs) -> torch.Tensor:
        """All steps from the shared initial noise: ``[1, 4, f, h, w]`` latents."""
        latents = self.noise.expand(-1, -1, chunk.frames, -1, -1).clone()
        deep = None
        for j in range(len(self.timesteps)):
            latents, deep = self.unet_step(latents, j, chunk, deep)
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, chunk: ChunkInputs | None = None) -> torch.Tensor:
        """Decode to ``[f, S, S, 3]`` uint8; with a ``chunk`` that holds the faces, the kept pixels
        are pasted back (upstream's in-crop paste); without, the raw decoded faces (for a blend
        that takes the kept region from the frame itself)."""
        out = self.vae_decoder(latents[0].transpose(0, 1)).float()                # [f, S, S, 3] in [0, 255]
        if chunk is not None and chunk.pixels is not None:
            out = out * (1.0 - chunk.keep) + chunk.pixels * chunk.keep
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, faces: torch.Tensor, masks: torch.Tensor | np.ndarray, audio: torch.Tensor) -> torch.Tensor:
        chunk = self.prepare(faces, masks, audio)
        return self.decode(self.denoise(chunk), chunk)
