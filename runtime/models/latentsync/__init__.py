"""LatentSync 1.6 (ByteDance, 512x512 latent diffusion lip-sync) as a talkrt model family.

* :mod:`.config` - ``load_latentsync_config("latentsync16" | "latentsync16-tiny")``
* :mod:`.unet` - :class:`LatentSyncUNet` (upstream ``UNet3DConditionModel``, stage2_512)
* :mod:`.audio` - Whisper-tiny states and per-frame 50-token windows, seam-free
* :mod:`.generator` - :class:`LatentSyncGenerator`: prepare / DDIM loop with guidance and DeepCache / decode
* :mod:`.weights` - official layout loader and synthetic weights

The lower-face mask and the face alignment live in :mod:`talkrt.face.align_mask` and
:mod:`talkrt.face.align`. Import the modules by their own names: this package imports nothing,
so that reading a config (:mod:`.config`) does not import torch, diffusers and transformers.
"""
