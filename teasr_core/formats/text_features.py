"""Text features for models with a text stream (a Qwen-Image base): one safetensors file, `context` [T, D].

TEASR trains with one fixed prompt (the precursor: the empty prompt), so its text encoder runs once,
outside the trainer: the TEASR Save Text Features node writes its CONDITIONING here, the trainer reads
it (`context_file`), and at inference the sampler takes the same CONDITIONING.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from ..safetensors_io import CheckpointError, read_tensors

KEY = "context"


def save_text_features(path, context: torch.Tensor, source: str = "") -> Path:
    """Write [T, D] features (float32); `source` (e.g. the prompt) goes into the file's metadata."""
    if context.ndim != 2:
        raise ValueError(f"text features must be [tokens, features], got shape {tuple(context.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"teasr_text_features": json.dumps({"tokens": context.shape[0], "features": context.shape[1], "source": source})}
    safetensors.torch.save_file({KEY: context.detach().float().cpu().contiguous()}, str(path), metadata=meta)
    return path


def load_text_features(path, features: int) -> torch.Tensor:
    """[T, D] features from `path`, refused unless D is the model's context width."""
    tensors = read_tensors(Path(path), "cpu")
    context = tensors.get(KEY)
    if context is None or context.ndim != 2:
        raise CheckpointError(f"{path} is not a text-features file: it needs a `{KEY}` tensor [tokens, features] "
                              "(the TEASR Save Text Features node writes one)")
    if context.shape[1] != features:
        raise CheckpointError(f"{path} holds {context.shape[1]}-dim text features; this model's text stream takes "
                              f"{features} (Qwen-Image: 3584, from its Qwen2.5-VL text encoder)")
    return context
