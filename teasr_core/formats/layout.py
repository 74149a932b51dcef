"""Fitting a model built on the meta device to the tensors of a file, and the tensor-name rules.

Models are built on the meta device and a file's tensors are assigned into them, so loading a 20 B
base never materialises a throw-away random init; before the strict load, layers get the fp8 slots
and LoRA ranks the file has. Shared by our checkpoints (load.py), Qwen-Image bases (qwen_image.py)
and dual-LoRA files.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..network.lora import BRANCHES, FP8, dual_lora_layers
from ..network.model import DiTConfig, DualBranchDiT


def is_float8(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() == 1


def castable(name: str, t: torch.Tensor) -> bool:
    """`dtype` options cast floating tensors, never fp8 weights or their scales."""
    return t.is_floating_point() and not is_float8(t) and name.rpartition(".")[2] != "weight_scale"


def is_lora_key(name: str) -> bool:
    return name.rpartition(".")[2].startswith("lora_")


def is_delta_key(name: str) -> bool:
    """The tensors TEASR trains on top of a base: what a "lora" checkpoint holds."""
    return is_lora_key(name) or name.startswith("time_text_embed_2.") or name == "null_context"


def describe_config(cfg: DiTConfig, preset: str | None = None) -> str:
    fields_text = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
    return f"preset {preset!r} ({fields_text})" if preset else f"DiTConfig({fields_text})"


def meta_model(cfg: DiTConfig) -> DualBranchDiT:
    with torch.device("meta"):
        return DualBranchDiT(cfg)


def fit_fp8_slots(dit: DualBranchDiT, tensors: dict) -> None:
    """Layers whose file weight is fp8 get an fp8 weight and a per-channel scale slot."""
    for name, layer in dual_lora_layers(dit):
        weight = tensors.get(f"{name}.weight")
        if weight is not None and weight.dtype == FP8 and not layer.is_fp8:
            layer.weight = nn.Parameter(torch.empty(weight.shape, dtype=FP8, device="meta"), requires_grad=False)
            layer.weight_scale = torch.empty(weight.shape[0], device="meta")


def fit_lora(dit: DualBranchDiT, tensors: dict, layer_alphas: dict) -> None:
    """Give every layer the LoRA ranks the file has (None where it has none), before a strict load.


    Alphas come from the file's `lora_alphas`; a layer it does not list keeps its configured
    alpha when the rank matches, else alpha = rank (what merge_lora sets).
    """
    for name, layer in dual_lora_layers(dit):
        ranks, alphas = [], []
        for k, branch in enumerate(BRANCHES):
            a, b = tensors.get(f"{name}.lora_{branch}_A"), tensors.get(f"{name}.lora_{branch}_B")
            rank = a.shape[0] if a is not None else b.shape[-1] if b is not None else 0
            if rank:
                setattr(layer, f"lora_{branch}_A", nn.Parameter(torch.empty(rank, layer.in_features, device="meta")))
                setattr(layer, f"lora_{branch}_B", nn.Parameter(torch.empty(layer.out_features, rank, device="meta")))
            else:
                setattr(layer, f"lora_{branch}_A", None)
                setattr(layer, f"lora_{branch}_B", None)
            stored = layer_alphas.get(name)
            ranks.append(rank)
            alphas.append(float(stored[k]) if stored else layer.alphas[k] if rank == layer.ranks[k] else float(rank))
        layer.ranks, layer.alphas = tuple(ranks), tuple(alphas)


def _cast_floating(dit: DualBranchDiT, dtype: torch.dtype) -> None:
    """Cast in place one tensor at a time, so a big model never exists twice."""
    for module in dit.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if castable(name, t) and t.dtype != dtype:
                cast = t.detach().to(dtype)
                setattr(module, name, nn.Parameter(cast, requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter) else cast)


def finish_loading(dit: DualBranchDiT, dtype, fp8: bool) -> DualBranchDiT:
    """Optional fp8 storage of the block weights (from the loaded precision), then the dtype cast."""
    if fp8:
        dit.quantize_base_fp8()
    if dtype is not None:
        _cast_floating(dit, dtype)
    return dit.eval()

