"""The TEASR checkpoint format, and writing it: safetensors only, never a pickle.

A TEASR checkpoint is one .safetensors file. Its tensors are the DiT state dict ("full") or only
the TEASR-trained parts ("lora": the LoRA factors, `time_text_embed_2` and a `null_context` if
the model has one), applied on top of a base. The header metadata key "teasr" holds the JSON
config: format_version, kind, preset, dit (DiTConfig.to_dict()), codec, lora_ranks, version,
training, sampling (the settings the model is best sampled with, e.g. {"end_ratio": 0.85}; optional), plus `lora_alphas`, {layer: [alpha_noise, alpha_cond]} for every layer with a LoRA,
because `merge_lora` leaves layers whose ranks and alphas differ from the config's.

A model may carry codec tensors of its own under `codec.` (today: a TAEF2 decoder fine-tuned on its
samples, `codec.decoder.*`, with codec["decoder"] = "checkpoint"), so the file stays one download.

Reading it back is load.py's job.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

from .. import __version__
from ..codecs.build import OWN_DECODER
from ..network.lora import dual_lora_layers
from ..network.model import DiTConfig, DualBranchDiT
from .layout import castable, is_delta_key

FORMAT_VERSION = 1
METADATA_KEY = "teasr"
CODEC_PREFIX = "codec."


def _check_codec(codec: dict, cfg: DiTConfig) -> None:
    """Refuse to write a checkpoint whose codec cannot feed its model."""
    if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
        raise ValueError(f"codec must be a dict with a 'name' (e.g. {{'name': 'pixel', 'scale': 8}}), got {codec!r}")
    channels = 3 * codec.get("scale", 8) ** 2 if codec["name"] == "pixel" else len(codec.get("latent_mean", ()))
    if channels and channels != cfg.in_channels:
        raise ValueError(f"codec {codec} gives {channels}-channel latents but the model takes {cfg.in_channels}")



def _file_tensors(state: dict, dtype) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each owning its storage (safetensors refuses shared or partial storage)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and castable(name, t):
            t = t.to(dtype)
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if t.nbytes and (key in seen or storage.nbytes() != t.nbytes or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(key)
        out[name] = t
    return out



def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    """Write `<path>.tmp` beside the target, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable (Windows cannot open folders)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)



def save_checkpoint(path, dit: DualBranchDiT, codec: dict, *, preset: str | None = None,
                    training: dict | None = None, sampling: dict | None = None, lora_only: bool = False,
                    dtype: torch.dtype | None = None, codec_tensors: dict | None = None) -> Path:
    """Write a TEASR checkpoint atomically; `dtype` (e.g. float16) shrinks the file.

    `codec_tensors` (names without the `codec.` prefix): the model's own codec weights, which its
    codec config must name (codec["decoder"] = "checkpoint" for a TAEF2 decoder).

    `lora_only` writes the delta, which is only valid on the exact base weights it was trained on:
    `merge_lora` rewrites base weights, so save a merged model in full.
    """
    state = dit.state_dict()
    if lora_only:
        state = {k: v for k, v in state.items() if is_delta_key(k)}
    if bool(codec_tensors) != (codec.get("decoder") == OWN_DECODER):
        raise ValueError(f"codec tensors and codec config disagree: {len(codec_tensors or {})} tensors, config "
                         f"decoder {codec.get('decoder')!r} (a model's own decoder needs both)")
    layer_alphas = {name: list(layer.alphas) for name, layer in dual_lora_layers(dit) if any(layer.ranks)}
    meta = checkpoint_metadata(dit.cfg, codec, kind="lora" if lora_only else "full", preset=preset,
                               layer_alphas=layer_alphas, training=training, sampling=sampling)
    tensors = _file_tensors(state, dtype)
    tensors.update({CODEC_PREFIX + k: v for k, v in _file_tensors(codec_tensors or {}, dtype).items()})
    return write_checkpoint(path, tensors, meta)



def write_checkpoint(path, tensors: dict, meta: dict) -> Path:
    """Write tensors + TEASR metadata (from `checkpoint_metadata`) as one safetensors file, atomically."""
    path = Path(path)
    _atomic_save(tensors, path, {METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path



def checkpoint_metadata(cfg: DiTConfig, codec: dict, *, kind: str, preset: str | None = None,
                        layer_alphas: dict | None = None, training: dict | None = None,
                        sampling: dict | None = None) -> dict:
    """The header's TEASR config (see the module docstring); refuses a codec that cannot feed the model."""
    _check_codec(codec, cfg)
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "preset": preset,
        "dit": cfg.to_dict(),
        "codec": codec,
        "lora_ranks": list(cfg.lora_ranks),
        "lora_alphas": layer_alphas or {},
        "version": __version__,
        "training": training or {},
        **({"sampling": sampling} if sampling else {}),
    }

