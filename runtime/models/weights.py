"""Load the official MuseTalk v1.5 checkpoints, or build synthetic weights of the true architecture.

Official layout (what MuseTalk's download script produces), under ``--weights DIR``::

    DIR/musetalkV15/unet.pth          UNet2DConditionModel state dict
    DIR/musetalkV15/musetalk.json     its diffusers config
    DIR/sd-vae/config.json            diffusers AutoencoderKL folder
    DIR/sd-vae/diffusion_pytorch_model.safetensors   (or .bin)
    DIR/whisper/config.json           Hugging Face whisper-tiny folder
    DIR/whisper/model.safetensors     (or pytorch_model.bin)

Without ``--weights`` talkrt builds SYNTHETIC weights (fixed seed): the output then has the
right shapes and speed but is not lip-synced, and says so in its metadata.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from talkrt.config import TalkrtConfig
from talkrt.errors import InputError
from talkrt.models.audio import WhisperStack, whisper_config
from talkrt.models.unet import LipSyncUNet, build_unet, unet_diffusers_config
from talkrt.models.vae import VaeDecoder, VaeEncoder, build_vae, vae_diffusers_config

log = logging.getLogger(__name__)

UNET_DIR, UNET_WEIGHTS, UNET_JSON = "musetalkV15", "unet.pth", "musetalk.json"
VAE_DIR, WHISPER_DIR = "sd-vae", "whisper"


@dataclass
class LipSyncModels:
    """The four networks of the pipeline, ready for inference (eval mode, on one device)."""

    unet: LipSyncUNet
    vae_encoder: VaeEncoder
    vae_decoder: VaeDecoder
    whisper: WhisperStack
    source: str          # "official" or "synthetic"
    identity: str        # short hash identifying the weights (part of cache keys)

    def to(self, device: torch.device, dtype: torch.dtype) -> "LipSyncModels":
        for net in (self.unet, self.vae_encoder, self.vae_decoder, self.whisper):
            net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise InputError(folder, f"missing weights file (expected one of {', '.join(names)})")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(path, f"missing {what}; see README 'Official weights' for the expected layout")
    return path


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (its type name when it has none), at most ``limit`` characters."""
    line = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _read_checkpoint(path: Path, what: str):
    """``torch.load(path)`` of plain tensors (``weights_only=True``), or InputError naming ``path``
    with a one-line reason: torch's own text is many lines and advises ``weights_only=False``,
    which is wrong advice for a file that is simply not a checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:                      # a folder, no permission, an I/O error
        reason = exc.strerror or _one_line(exc)
        raise InputError(path, f"cannot read the {what}: {reason}") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = (f"it holds a Python object of type {found[1]}, not only tensors; save its state dict alone"
                  if found else "not a PyTorch checkpoint (or truncated); copy or download it again")
        raise InputError(path, f"cannot read the {what}: {reason}") from exc


# torch's load_state_dict line for one tensor (diffusers raises these, one line per tensor)
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def _from_pretrained(cls, folder: Path, what: str, **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` (a diffusers or transformers model folder, local files
    only), or InputError naming ``folder`` in one line. When ``config.json`` does not match the weights,
    diffusers raises torch's RuntimeError with one line per tensor and transformers (asked with
    ``ignore_mismatched_sizes=True``) lists them in its loading info: the first and the count are given."""
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        found = _SIZE_MISMATCH.findall(str(exc))
        if found:
            raise InputError(folder, _mismatch(found[0], len(found))) from exc
        raise InputError(folder, f"cannot load the {what}: {_one_line(exc)}") from exc
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda entry: entry[0])   # transformers: a set
    if mismatched:
        key, ckpt, model_shape = mismatched[0]
        raise InputError(folder, _mismatch((key, ", ".join(map(str, ckpt)), ", ".join(map(str, model_shape))),
                                           len(mismatched)))
    return model


def _mismatch(first: tuple[str, str, str], count: int) -> str:
    key, ckpt, model = first
    return (f"config.json does not match the weights: {count} tensors have another shape, e.g. {key}: [{ckpt}] "
            f"in the weights, [{model}] from config.json; use the config.json that came with these weights")


def _load_state(module: torch.nn.Module, state: dict, path: Path, against: str) -> None:
    """Load ``state`` into ``module`` (every key and shape must match) or raise InputError naming
    ``path``; ``against``: what the file was expected to match, for the message."""
    own = module.state_dict()
    shapes = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        raise InputError(path, f"{len(shapes)} tensors have the wrong shape for {against}, e.g. {k}: "
                               f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} expected")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(path, f"state dict does not match {against}: {len(missing)} missing keys "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


def _weights_fingerprint(paths: list[Path]) -> str:
    """16 hex digits of SHA-256 over each file's name, size, first and last MiB.

    Not a full content hash (``talkrt.hashing.sha256_files``): checkpoints are GBs and this runs
    on every load, so it reads 2 MiB per file, enough to tell different checkpoints apart.
    """
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()[:16]


def _assemble(cfg: TalkrtConfig, unet: UNet2DConditionModel, vae: AutoencoderKL, encoder: WhisperEncoder,
              source: str, identity: str) -> LipSyncModels:
    hidden = encoder.config.encoder_layers + 1
    tokens = cfg.model.audio.window_steps * hidden
    return LipSyncModels(
        unet=LipSyncUNet(unet, tokens), vae_encoder=VaeEncoder(vae), vae_decoder=VaeDecoder(vae),
        whisper=WhisperStack(encoder), source=source, identity=identity,
    )


def build_synthetic(cfg: TalkrtConfig, seed: int | None = None) -> LipSyncModels:
    """Random weights of the configured architecture from a fixed seed (NOT lip-synced)."""
    seed = cfg.pipeline.weights_seed if seed is None else seed
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        networks = _build_networks(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    _warn_synthetic(cfg, seed)
    return _assemble(cfg, *networks, "synthetic", _synthetic_identity(cfg, seed))


def _build_networks(cfg: TalkrtConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, WhisperEncoder]:
    """The configured UNet, VAE and Whisper encoder, initialised as their constructors do."""
    return (build_unet(unet_diffusers_config(cfg.model)), build_vae(vae_diffusers_config(cfg.model)),
            WhisperEncoder(whisper_config(cfg.model.audio)))


def _synthetic_identity(cfg: TalkrtConfig, seed: int) -> str:
    """The identity of synthetic weights (part of the avatar and engine cache keys)."""
    return f"synthetic-{cfg.model_hash()}-{seed}"


def _warn_synthetic(cfg: TalkrtConfig, seed: int, cached: Path | None = None) -> None:
    log.warning("SYNTHETIC WEIGHTS (seed %d, config '%s'%s): the output will NOT be lip-synced. "
                "Pass --weights DIR with the official MuseTalk v1.5 checkpoints for real results.", seed, cfg.name,
                f", cached in {cached}" if cached else "")


def load_official(cfg: TalkrtConfig, weights_dir: str | Path) -> LipSyncModels:
    """Load MuseTalk v1.5 checkpoints from the official folder layout (see module docstring)."""
    root = _require(Path(weights_dir), "weights folder")
    unet_json_path = _require(root / UNET_DIR / UNET_JSON, "UNet config")
    unet_path = _require(root / UNET_DIR / UNET_WEIGHTS, "UNet weights")
    vae_dir = _require(root / VAE_DIR, "VAE folder")
    whisper_dir = _require(root / WHISPER_DIR, "Whisper folder")
    try:
        unet_json = json.loads(unet_json_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(unet_json_path, f"not valid JSON ({exc})") from exc
    unet = build_unet(unet_json)
    state = _read_checkpoint(unet_path, "UNet checkpoint")
    if not isinstance(state, dict):
        raise InputError(unet_path, "not a UNet state dict (expected a dict of tensors)")
    _load_state(unet, state, unet_path, "musetalk.json")
    # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate`, minus its warning
    vae = _from_pretrained(AutoencoderKL, vae_dir, "VAE folder", low_cpu_mem_usage=False)
    encoder = _from_pretrained(WhisperModel, whisper_dir, "Whisper folder", ignore_mismatched_sizes=True).encoder
    if unet_json.get("cross_attention_dim") != encoder.config.d_model:
        raise InputError(unet_json_path, f"cross_attention_dim {unet_json.get('cross_attention_dim')} does not "
                                         f"match the Whisper width {encoder.config.d_model}")
    files = [unet_path, _first_existing(vae_dir, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
             _first_existing(whisper_dir, ("model.safetensors", "pytorch_model.bin"))]
    log.info("loaded official MuseTalk v1.5 weights from %s", root)
    return _assemble(cfg, unet, vae, encoder, "official", f"official-{_weights_fingerprint(files)}")


def load_models(cfg: TalkrtConfig, weights_dir: str | Path | None, device: torch.device,
                dtype: torch.dtype, cache_dir: Path | None = None) -> LipSyncModels:
    """The official checkpoints of ``weights_dir``, else synthetic weights, on ``device`` in ``dtype``.

    With ``cache_dir``, synthetic weights are kept there after their first build, as they are
    on the device (:func:`synthetic_cache_path`), and later loads read that file straight to
    the device instead of re-running the random initialisers (seconds of CPU for the full-size
    model). A cache file that cannot be used is ignored (a warning) and rebuilt.

    Raises:
        InputError: the official layout is incomplete or does not match (see :func:`load_official`).
    """
    if weights_dir:
        return load_official(cfg, weights_dir).to(device, dtype)
    if cache_dir is None:
        return build_synthetic(cfg).to(device, dtype)
    path = synthetic_cache_path(cfg, dtype, cache_dir)
    if path.is_file():
        try:
            return _load_cached_synthetic(cfg, path, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a bad cache file is rebuilt, never fatal
            log.warning("ignoring the synthetic weights cache %s (%s); rebuilding it", path, exc)
    models = build_synthetic(cfg).to(device, dtype)
    _save_synthetic(models, path)
    return models


def synthetic_cache_path(cfg: TalkrtConfig, dtype: torch.dtype, cache_dir: Path) -> Path:
    """``cache_dir/weights/synthetic-<model hash>-<seed>-<dtype>.safetensors``."""
    seed = cfg.pipeline.weights_seed
    return Path(cache_dir) / "weights" / f"synthetic-{cfg.model_hash()}-{seed}-{str(dtype).split('.')[-1]}.safetensors"


def _networks(models: LipSyncModels) -> dict[str, torch.nn.Module]:
    """The four inference modules; their state dicts hold every tensor they use."""
    return {"unet": models.unet, "vae_encoder": models.vae_encoder, "vae_decoder": models.vae_decoder,
            "whisper": models.whisper}


def _save_synthetic(models: LipSyncModels, path: Path) -> None:
    from safetensors.torch import save_file
    state = {f"{part}.{k}": v.contiguous() for part, net in _networks(models).items()
             for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"talkrt": "synthetic weights", "identity": models.identity})
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the synthetic weights in %s (%s)", path, exc)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cached_synthetic(cfg: TalkrtConfig, path: Path, device: torch.device, dtype: torch.dtype) -> LipSyncModels:
    """The networks built without initialisers (on the meta device), then given the cached tensors."""
    from safetensors.torch import load_file
    with torch.device("meta"):
        networks = _build_networks(cfg)
    seed = cfg.pipeline.weights_seed
    models = _assemble(cfg, *networks, "synthetic", _synthetic_identity(cfg, seed))
    state = load_file(str(path), device=str(device))
    for part, net in _networks(models).items():
        prefix = part + "."
        net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                            strict=True, assign=True)
        left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{part}: {len(left)} tensors not in the file (e.g. {left[0]})")
    _warn_synthetic(cfg, seed, path)
    return models.to(device, dtype)


def save_official_layout(models: LipSyncModels, cfg: TalkrtConfig, root: str | Path) -> Path:
    """Write ``models`` in the official folder layout (used by tests and ``make`` sample checkpoints)."""
    root = Path(root)
    (root / UNET_DIR).mkdir(parents=True, exist_ok=True)
    unet = models.unet.unet
    torch.save(unet.state_dict(), root / UNET_DIR / UNET_WEIGHTS)
    (root / UNET_DIR / UNET_JSON).write_text(json.dumps(unet_diffusers_config(cfg.model), indent=2))
    vae = build_vae(vae_diffusers_config(cfg.model))
    vae.encoder, vae.quant_conv = models.vae_encoder.encoder, models.vae_encoder.quant_conv
    vae.decoder, vae.post_quant_conv = models.vae_decoder.decoder, models.vae_decoder.post_quant_conv
    vae.save_pretrained(root / VAE_DIR)
    whisper = WhisperModel(whisper_config(cfg.model.audio))
    whisper.encoder = models.whisper.encoder
    whisper.save_pretrained(root / WHISPER_DIR)
    return root
