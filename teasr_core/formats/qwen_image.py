"""Qwen-Image base transformers as TEASR models: ComfyUI's and diffusers' layouts, bf16 / fp8 files.

A base file in ComfyUI's layout (bare or `model.diffusion_model.` keys; bf16, fp8 or scaled fp8) or
a diffusers transformer folder (single or sharded) becomes a DualBranchDiT with fresh LoRAs; its
config is inferred from diffusers' config.json or the tensor shapes (headers only).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from ..network.lora import FP8, dual_lora_layers
from ..network.model import DiTConfig, DualBranchDiT
from ..safetensors_io import (SAFETENSORS_ONLY, CheckpointError, check_names, header_shapes, read_header, read_tensors,
                              tensor_shapes)
from .checkpoint import METADATA_KEY
from .layout import describe_config, finish_loading, fit_fp8_slots, is_delta_key, is_float8, is_lora_key, meta_model

COMFY_PREFIX = "model.diffusion_model."
QWEN_ROPE_AXES = (16, 56, 56)           # Qwen-Image's split of its 128-dim heads (frame, row, col)
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"


def looks_like_qwen_base(shapes: dict) -> bool:
    return "img_in.weight" in shapes and "transformer_blocks.0.attn.to_q.weight" in shapes


def comfy_prefix(shapes: dict) -> str:
    """ComfyUI's full checkpoints nest the diffusion model under `model.diffusion_model.`."""
    return COMFY_PREFIX if any(name.startswith(COMFY_PREFIX) for name in shapes) else ""


def _diffusers_folder(path: Path) -> Path:
    """The transformer folder of a diffusers pipeline (its `transformer/` subfolder also accepted)."""
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path} is a folder without config.json; expected a diffusers transformer "
                              f"folder (config.json + {DIFFUSERS_SINGLE} or sharded files with {DIFFUSERS_INDEX})")
    return folder


def _diffusers_files(folder: Path) -> list[Path]:
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt shard index ({e!r})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / DIFFUSERS_SINGLE).is_file():
        return [folder / DIFFUSERS_SINGLE]
    raise CheckpointError(f"{folder} has no {DIFFUSERS_SINGLE} or {DIFFUSERS_INDEX}. {SAFETENSORS_ONLY}.")


def _qwen_sources(path: Path) -> list[tuple[Path, str]]:
    """(file, key prefix) pairs holding a base transformer; refuses TEASR checkpoints."""
    if path.is_dir():
        return [(f, "") for f in _diffusers_files(_diffusers_folder(path))]
    header = read_header(path)
    if METADATA_KEY in (header.get("__metadata__") or {}):
        raise CheckpointError(f"{path} is a TEASR checkpoint, not a Qwen-Image base; load it with load_checkpoint")
    return [(path, comfy_prefix(header_shapes(header)))]


def _rope_axes_for(head_dim: int) -> tuple[int, int, int]:
    """Qwen-Image's (16, 56, 56) for 128-dim heads; other widths split in the same proportion (even sizes)."""
    if head_dim == 128:
        return QWEN_ROPE_AXES
    spatial = 2 * round(head_dim * QWEN_ROPE_AXES[1] / 128 / 2)
    return head_dim - 2 * spatial, spatial, spatial


def infer_qwen_image_config(path) -> DiTConfig:
    """The DiTConfig of a Qwen-Image base (no LoRA), from diffusers' config.json or the tensor shapes.


    From shapes alone (patch 2 assumed): depth = number of transformer_blocks, width from img_in,
    head_dim from attn.norm_q, context_dim from txt_in, mlp_ratio from img_mlp, rope_axes by
    `_rope_axes_for(head_dim)`. Reads headers only.
    """
    path = Path(path)
    shapes = {}
    for file, prefix in _qwen_sources(path):
        shapes.update(header_shapes(read_header(file), prefix))
    needed = ("img_in.weight", "txt_in.weight", "transformer_blocks.0.attn.norm_q.weight",
              "transformer_blocks.0.img_mlp.net.0.proj.weight")
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise CheckpointError(f"{path} does not look like a Qwen-Image transformer: no {', '.join(absent)}")
    width, token_dim = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    cfg = DiTConfig(
        depth=len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}),
        heads=width // head_dim, head_dim=head_dim, in_channels=token_dim // 4,
        mlp_ratio=shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0] / width,
        context_dim=shapes["txt_in.weight"][1], rope_axes=_rope_axes_for(head_dim))
    if path.is_dir():
        config_path = _diffusers_folder(path) / "config.json"
        try:
            config = json.loads(config_path.read_text())
            patch = config.get("patch_size", 2)
            cfg = replace(cfg, depth=config["num_layers"], heads=config["num_attention_heads"],
                          head_dim=config["attention_head_dim"], context_dim=config["joint_attention_dim"],
                          in_channels=config["in_channels"] // patch ** 2, patch=patch,
                          rope_axes=tuple(config.get("axes_dims_rope", QWEN_ROPE_AXES)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{config_path}: not a usable QwenImageTransformer2DModel config ({e!r})") from None
    return cfg


def _stored_float_dtype(tensors: dict) -> torch.dtype:
    """The file's working precision: the commonest non-fp8 float dtype (bf16 if all are fp8)."""
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point() and not is_float8(t))
    return counts.most_common(1)[0][0] if counts else torch.bfloat16


def _absorb_fp8_scales(tensors: dict, fp8_layers: set, float_dtype: torch.dtype) -> None:
    """ComfyUI fp8 files -> our layout.


    "Scaled fp8" files store weights as float8_e4m3fn with a per-tensor `<layer>.scale_weight`
    (newer mixed-precision files: `<layer>.weight_scale`) and a marker key `scaled_fp8`; plain fp8
    files have no scale (1). DualLoRALinear layers keep the fp8 weight with the scale expanded per
    output channel; everything else is dequantised to `float_dtype`. Activation scales
    (`scale_input` / `input_scale`) serve fp8 matmuls only and are dropped.
    """
    tensors.pop("scaled_fp8", None)
    for name in [k for k in tensors if k.endswith((".scale_input", ".input_scale"))]:
        del tensors[name]
    for name, t in list(tensors.items()):
        layer, _, leaf = name.rpartition(".")
        scale_key = next((f"{layer}.{s}" for s in ("scale_weight", "weight_scale")
                          if leaf == "weight" and f"{layer}.{s}" in tensors), None)
        if not is_float8(t) and scale_key is None:
            continue
        scale = tensors.pop(scale_key).float().reshape(-1) if scale_key else torch.ones(1, device=t.device)
        if t.dtype == FP8 and leaf == "weight" and layer in fp8_layers:
            tensors[f"{layer}.weight_scale"] = scale.expand(t.shape[0]).contiguous()
        else:
            tensors[name] = (t.float() * scale.reshape(-1, *[1] * (t.ndim - 1))).to(float_dtype)


def read_qwen_base_tensors(path, names) -> dict[str, torch.Tensor]:
    """Only the named tensors of a Qwen-Image base (fp8 ones dequantized), e.g. its timestep embedder."""
    wanted = {n for name in names for n in (name, *(name.rpartition(".")[0] + s for s in (".scale_weight", ".weight_scale")))}
    tensors = {}
    for file, prefix in _qwen_sources(Path(path)):
        tensors.update(read_tensors(file, "cpu", prefix, wanted))
    _absorb_fp8_scales(tensors, set(), _stored_float_dtype(tensors))
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} is not a Qwen-Image base: it has no {', '.join(missing)}")
    return tensors


def load_qwen_image_base(path, *, cfg: DiTConfig | None = None, device="cpu",
                         dtype: torch.dtype | None = None) -> DualBranchDiT:
    """A TEASR model initialised from a Qwen-Image base transformer, in eval mode.


    `path`: one .safetensors file in ComfyUI's layout (bare or `model.diffusion_model.` keys; bf16,
    fp8 or scaled fp8; a full checkpoint's VAE and text encoder are not read) or a diffusers
    transformer folder. `cfg` defaults to the inferred config (no LoRA). TEASR's rule: `time_text_embed_2` starts as a copy of `time_text_embed`, LoRA
    factors at their fresh init (B = 0), so the model starts as exactly the base.
    """
    path = Path(path)
    cfg = cfg or infer_qwen_image_config(path)
    if cfg.context_dim is None:
        raise CheckpointError("a Qwen-Image base has a text stream: cfg.context_dim must be set (3584 for Qwen-Image)")
    tensors = {}
    for file, prefix in _qwen_sources(path):
        tensors.update(read_tensors(file, device, prefix))
    dit = meta_model(cfg)
    _absorb_fp8_scales(tensors, {name for name, _ in dual_lora_layers(dit)}, dtype or _stored_float_dtype(tensors))
    fit_fp8_slots(dit, tensors)
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items() if not is_delta_key(k)}
    check_names(path, expected, tensor_shapes(tensors), f"a Qwen-Image transformer with {describe_config(cfg)}")


    for name in [k for k in tensors if k.startswith("time_text_embed.")]:
        tensors["time_text_embed_2." + name.removeprefix("time_text_embed.")] = tensors[name].clone()
    compute = tensors["time_text_embed.timestep_embedder.linear_1.weight"].dtype
    for name, slot in dit.state_dict().items():
        if is_lora_key(name):    # lora.py's init: A ~ N(0, 1/r), B = 0
            fresh = torch.randn(slot.shape, device=device) / math.sqrt(slot.shape[0]) if name.endswith("_A") \
                else torch.zeros(slot.shape, device=device)
            tensors[name] = fresh.to(compute)
    dit.load_state_dict(tensors, strict=True, assign=True)
    return finish_loading(dit, dtype, fp8=False)

