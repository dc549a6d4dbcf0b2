"""OpenAI Whisper checkpoints (``tiny.pt``) <-> transformers' ``WhisperEncoder``.

OpenAI's format (``whisper/__init__.py:load_model``) is ``{"dims": {...}, "model_state_dict":
{...}}``; only the ``encoder.*`` entries are used. Both implementations compute the same thing:
OpenAI scales q and k by ``head_dim ** -0.25`` each, transformers q by ``head_dim ** -0.5``; both
use exact GELU, LayerNorm eps 1e-5, a bias-free key projection and the same sinusoidal positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from talkrt.errors import InputError
from talkrt.models.audio import SEGMENT_STEPS, whisper_config
from talkrt.models.latentsync.config import LatentSyncAudioConfig
from talkrt.models.weights import _read_checkpoint
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids

# OpenAI encoder name (after "encoder.") -> transformers WhisperEncoder name; per layer i
_TOP = {"conv1": "conv1", "conv2": "conv2", "ln_post": "layer_norm"}
_LAYER = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
          "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
          "mlp_ln": "final_layer_norm"}


def _dims_for(cfg: LatentSyncAudioConfig) -> dict[str, int]:
    return {"n_mels": cfg.num_mel_bins, "n_audio_ctx": SEGMENT_STEPS, "n_audio_state": cfg.d_model,
            "n_audio_head": cfg.encoder_attention_heads, "n_audio_layer": cfg.encoder_layers}


def _rename(key: str) -> str | None:
    """transformers name of an OpenAI ``encoder.`` key (without the prefix), or None if unknown."""
    if key == "positional_embedding":
        return "embed_positions.weight"
    head, _, tail = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{tail}"
    if head == "blocks":
        index, _, rest = tail.partition(".")
        for old, new in _LAYER.items():
            if rest.startswith(old + "."):
                return f"layers.{index}.{new}.{rest[len(old) + 1:]}"
    return None


def encoder_from_openai(path: str | Path, cfg: LatentSyncAudioConfig) -> WhisperEncoder:
    """Load an OpenAI-format Whisper checkpoint into a ``WhisperEncoder`` of ``cfg``'s shape.

    Raises InputError naming ``path`` when the file is unreadable, not in OpenAI's format, of
    another size (``dims`` differ from the config, e.g. ``small.pt`` for a tiny config) or
    missing encoder weights.
    """
    path = Path(path)
    ckpt = _read_checkpoint(path, "Whisper checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("dims"), dict) or \
            not isinstance(ckpt.get("model_state_dict"), dict):
        raise InputError(path, "not an OpenAI Whisper checkpoint (expected a dict with 'dims' and 'model_state_dict')")
    want = _dims_for(cfg)
    wrong = {k: (ckpt["dims"].get(k), v) for k, v in want.items() if ckpt["dims"].get(k) != v}
    if wrong:
        raise InputError(path, "Whisper dims do not match the config: " +
                         ", ".join(f"{k}={got} (config needs {need})" for k, (got, need) in wrong.items()))
    encoder = WhisperEncoder(whisper_config(cfg))
    state, unknown = {}, []
    for key, value in ckpt["model_state_dict"].items():
        if not key.startswith("encoder."):
            continue
        name = _rename(key[len("encoder."):])
        if name is None:
            unknown.append(key)
        else:
            state[name] = value
    state.setdefault("embed_positions.weight", sinusoids(SEGMENT_STEPS, cfg.d_model))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected or unknown:
        raise InputError(path, f"Whisper encoder weights do not match: {len(missing)} missing (e.g. {missing[:2]}), "
                               f"{len(unknown) + len(unexpected)} unexpected (e.g. {(unknown + unexpected)[:2]})")
    return encoder


def save_openai(encoder: WhisperEncoder, cfg: LatentSyncAudioConfig, path: str | Path) -> Path:
    """Write ``encoder`` as an OpenAI-format checkpoint (encoder only; for tests and samples)."""
    reverse_top = {v: k for k, v in _TOP.items()}
    reverse_layer = {v: k for k, v in _LAYER.items()}
    state = {}
    for name, value in encoder.state_dict().items():
        if name == "embed_positions.weight":
            state["encoder.positional_embedding"] = value.clone()
            continue
        head, _, tail = name.partition(".")
        if head == "layers":
            index, _, rest = tail.partition(".")
            module, _, leaf = rest.rpartition(".")
            state[f"encoder.blocks.{index}.{reverse_layer[module]}.{leaf}"] = value.clone()
        else:
            state[f"encoder.{reverse_top[head]}.{tail}"] = value.clone()
    dims = {**_dims_for(cfg), "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": cfg.d_model,
            "n_text_head": cfg.encoder_attention_heads, "n_text_layer": cfg.encoder_layers}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path
