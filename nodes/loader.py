"""TEASR Loader: a checkpoint file -> TEASR_MODEL (the DiT under ComfyUI memory management + its codec)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import folder_paths
from comfy.model_patcher import ModelPatcher

from ..teasr_core.codecs.build import codec_from_config
from ..teasr_core.formats.load import BUNDLED_CHECKPOINT, TEASRCheckpoint, bundled_checkpoint_path, load_checkpoint
from ..teasr_core.upscale.pipeline import default_codec_dtype, default_dtype
from .common import CATEGORY, SEARCH_ALIASES, TEASR_MODEL, schema
from .model import ComfyVAECodec, TEASRModel

FOLDER = "teasr"
EXTENSIONS = {".safetensors", ".sft"}
BASE_FOLDER = "diffusion_models"
BUNDLED = f"{BUNDLED_CHECKPOINT.stem} (bundled)"
NO_BASE = "none"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SELF_CONTAINED_CODECS = ("pixel", "taef2")   # built by teasr_core; any other codec is an external VAE
log = logging.getLogger("teasr")


def register_model_folder() -> None:
    """models/teasr, safetensors only (a new folder name would otherwise list every file in it).

    Paths a user gave `teasr` in extra_model_paths.yaml (loaded before custom nodes) are kept.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    os.makedirs(default, exist_ok=True)   # so users see where checkpoints go
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, EXTENSIONS)


def checkpoint_path(choice: str) -> Path:
    if choice == BUNDLED:
        return bundled_checkpoint_path()
    return Path(folder_paths.get_full_path_or_raise(FOLDER, choice))


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The transformer's dtype: the choice; auto = ComfyUI's pick for GPUs, the library's (as the CLI) for CPUs."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cpu":
        return default_dtype(device)
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def codec_for(ckpt: TEASRCheckpoint, vae, device: torch.device, name: str, dtype: torch.dtype):
    """The checkpoint's own codec (computing in `dtype`), or the connected ComfyUI VAE for external-VAE checkpoints."""
    kind = ckpt.codec.get("name")
    if kind in SELF_CONTAINED_CODECS:
        if vae is not None:
            log.warning("TEASR: %s carries its own %r codec; the connected VAE is not used", name, kind)
        return codec_from_config(ckpt.codec, device=device, dtype=dtype, tensors=ckpt.codec_tensors)
    if vae is None:
        raise ValueError(f"{name} works in the latent space of an external VAE "
                         f"({ckpt.codec.get('vae') or kind!r}): connect that VAE (e.g. Load VAE) to the vae input "
                         "of TEASR Loader")
    return ComfyVAECodec(vae, ckpt.codec, ckpt.dit.cfg.in_channels)


class TEASRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TEASRLoader",
            display_name="TEASR Loader",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Loads a TEASR super-resolution checkpoint (from models/teasr, or the bundled default) "
                        "for the TEASR upscale nodes. The model is managed like any ComfyUI model: loaded to the "
                        "GPU when an upscale runs, offloaded when other models need the memory.",
            inputs=[
                io.Combo.Input("checkpoint", options=[BUNDLED] + folder_paths.get_filename_list(FOLDER),
                               default=BUNDLED,
                               tooltip="TEASR checkpoint (.safetensors) in models/teasr; the bundled small "
                                       "pixel-space model is always available."),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Compute precision. auto: bf16 where the device supports it, else fp16, "
                                       "else fp32 (always fp32 on the CPU). Use fp32 if you get NaN errors."),
                io.Boolean.Input("fp8_base", default=False,
                                 tooltip="Store the frozen transformer-block weights as fp8 (half the memory of "
                                         "bf16, slightly lower quality). Useful for large models on small GPUs."),
                io.Combo.Input("base_model", options=[NO_BASE] + folder_paths.get_filename_list(BASE_FOLDER),
                               default=NO_BASE, optional=True,
                               tooltip="Only for TEASR LoRA checkpoints: the base transformer they were trained "
                                       "on (e.g. Qwen-Image from models/diffusion_models). Full checkpoints "
                                       "ignore it."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Only for TEASR checkpoints trained in an external VAE's latent space "
                                     "(e.g. Qwen-Image's VAE): connect that VAE. Pixel-space models ignore it."),
            ],
            outputs=[TEASR_MODEL.Output(display_name="model",
                                        tooltip="The loaded TEASR model, for TEASR AnyStep Sampler / Tiled Upscale.")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint, **_):
        """Reload when the file changes under the same name (a trainer overwriting its checkpoint)."""
        try:
            stat = checkpoint_path(checkpoint).stat()
        except (OSError, ValueError):
            return checkpoint
        return checkpoint, stat.st_mtime_ns, stat.st_size

    @classmethod
    def execute(cls, checkpoint, dtype, fp8_base, base_model=NO_BASE, vae=None) -> io.NodeOutput:
        path = checkpoint_path(checkpoint)
        base = None if base_model == NO_BASE else folder_paths.get_full_path_or_raise(BASE_FOLDER, base_model)
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        ckpt = load_checkpoint(path, device=offload, dtype=compute_dtype(dtype, device), fp8=fp8_base, base=base)
        codec_dtype = DTYPES[dtype] if dtype != "auto" else default_codec_dtype(device)
        codec = codec_for(ckpt, vae, device, path.stem, codec_dtype)
        patcher = ModelPatcher(ckpt.dit, load_device=device, offload_device=offload)
        return io.NodeOutput(TEASRModel(patcher, codec, ckpt.meta, path.stem, ckpt.sampling))
