"""What the sampler and the tiled node share: IMAGE <-> tensor layout, alpha/gray, settings, progress.

ComfyUI's IMAGE is [B, H, W, C] float in 0..1 with C = 3 (sometimes 4 = RGBA, or 1); teasr_core
takes [B, 3, H, W]. Each image of a batch is upscaled on its own with the same seed, so peak memory
does not grow with the batch and an image gives the same result alone or at any batch position
(video frames get the same noise, which keeps them consistent).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..teasr_core.sampling import MAX_STEPS, MODES, sigmas_from_timesteps
from ..teasr_core.upscale.color import COLOR_FIX_METHODS
from ..teasr_core.upscale.pipeline import UpscaleSettings, bicubic_rows, count_model_calls, upscale_into, upscale_settings
from .model import TEASRModel

CATEGORY = "image/upscaling/TEASR"
SEARCH_ALIASES = ["upscale", "super resolution", "restore", "enhance", "any-step", "teasr"]
TEASR_MODEL = io.Custom("TEASR_MODEL")
log = logging.getLogger("teasr")


def schema(**kwargs) -> io.Schema:
    """io.Schema, with `search_aliases` only where the running ComfyUI has them (not 0.3.75)."""
    if "search_aliases" not in {f.name for f in dataclasses.fields(io.Schema)}:
        kwargs.pop("search_aliases", None)
    return io.Schema(**kwargs)


def model_and_image_inputs() -> list:
    return [
        TEASR_MODEL.Input("model", tooltip="The TEASR model from TEASR Loader."),
        io.Image.Input("image", tooltip="Low-resolution image(s) to upscale x4. RGB, RGBA (alpha is upscaled "
                                        "bicubically and re-attached) or grayscale; a batch is upscaled image by image."),
    ]


def sampling_inputs() -> list:
    """The any-step controls, identical in both nodes (and named like the CLI flags)."""
    return [
        io.Int.Input("steps", default=1, min=1, max=MAX_STEPS,
                     tooltip="Model evaluations per image (per tile). 1 is fastest; 2-4 usually add detail. "
                             "Ignored when timesteps is set."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed. The noise is a function of position, so a seed gives the same "
                             "image for any tile size."),
        io.Combo.Input("mode", options=list(MODES), default="jump",
                       tooltip="Sampler. jump: predict the clean image, step on (deterministic). flowmap: jump "
                               "straight to the next noise level (deterministic). renoise: predict, then re-noise "
                               "with fresh noise (stochastic, can add texture)."),
        io.Float.Input("shift", default=1.0, min=0.05, max=20.0, step=0.05,
                       tooltip="Time shift of the noise schedule: > 1 spends more of the steps at high noise "
                               "(more generation), < 1 at low noise (more refinement)."),
        io.Float.Input("start_strength", default=0.5, min=0.01, max=1.0, step=0.01,
                       tooltip="1 = start from pure noise. Lower values start from the noised bicubic upscale: "
                               "closer to the input, less hallucinated detail."),
        io.Combo.Input("color_fix", options=list(COLOR_FIX_METHODS), default="wavelet",
                       tooltip="Keep the input's colours: wavelet swaps in the input's low frequencies, adain "
                               "matches per-channel mean and std, none keeps the model's colours."),
    ]


def optional_inputs() -> list:
    return [
        io.String.Input("timesteps", default="", optional=True,
                        tooltip="Explicit timesteps on the 0..1000 scale, strictly decreasing, e.g. "
                                "'999,750,500,250'. Empty: use steps and shift."),
        io.Float.Input("end_ratio", default=-1.0, min=-1.0, max=0.99, step=0.01, optional=True,
                       tooltip="Multi-step only: the last step's noise level as a share of start_strength; the "
                               "steps in between are evenly spaced. 0 = uniform steps down to 0. -1 = the "
                               "model's own setting (the bundled model: 0.85, its low-noise steps add grain)."),
        io.Int.Input("attention_tile", default=-1, min=-1, max=8192, step=16, optional=True,
                     tooltip="Side (output px) of the windows the transformer attends over; the codec keeps larger "
                             "tiles. -1 = the model's own (the bundled model: 384 px, near its 256-px training crops: "
                             "sharper and faster on large images), 0 = the whole image / tile."),
        io.Conditioning.Input("conditioning", optional=True,
                              tooltip="Text conditioning, only for TEASR models with a text stream (e.g. ones "
                                      "built on Qwen-Image); models without one ignore it."),
    ]


def image_output() -> io.Image.Output:
    return io.Image.Output(tooltip="The x4 upscaled image(s), same channel layout as the input.")


def timesteps_error(timesteps: str | None) -> str | None:
    """Why a timesteps string is unusable, or None; runs at queue time (validate_inputs)."""
    if not timesteps or not timesteps.strip():
        return None
    try:
        sigmas_from_timesteps(timesteps)
    except ValueError as e:
        return str(e)
    return None


def build_settings(*, steps, seed, mode, shift, start_strength, color_fix, timesteps=None, end_ratio=None,
                   attention_tile=None, scale=4, tile=None, tile_overlap=None) -> UpscaleSettings:
    """UpscaleSettings from node inputs; a negative end_ratio or attention_tile (the widgets' -1) means the model's own."""
    return upscale_settings(steps=steps, seed=seed, mode=mode, shift=shift, start_strength=start_strength,
                            color_fix=color_fix, timesteps=(timesteps or "").strip() or None,
                            end_ratio=None if end_ratio is None or end_ratio < 0 else end_ratio, scale=scale,
                            attention_tile=None if attention_tile is None or attention_tile < 0 else attention_tile,
                            tile=tile, tile_overlap=tile_overlap)


def context_for(model: TEASRModel, conditioning, index: int) -> torch.Tensor | None:
    """The text context of image `index` from a CONDITIONING list [[tensor [B, T, D], {...}], ...]."""
    if model.context_dim is None:
        if conditioning:
            log.warning("TEASR: %s has no text stream; the conditioning input is ignored", model.name)
        return None
    if not conditioning:
        raise ValueError(f"{model.name} has a text stream ({model.context_dim}-dim context): connect its "
                         "text conditioning to the conditioning input")
    context = conditioning[0][0]
    return context[min(index, context.shape[0] - 1)][None]


def split_channels(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """IMAGE [B, H, W, C] -> (rgb [B, 3, H, W], alpha [B, 1, H, W] or None, colour channels 1 or 3); the inverse is ImageCanvas."""
    if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an IMAGE [B, H, W, C] with C in 1..4, got shape {tuple(image.shape)}")
    planes = image.movedim(-1, 1).float()
    color_channels = 3 if planes.shape[1] >= 3 else 1
    color = planes[:, :color_channels]
    alpha = planes[:, color_channels:] if planes.shape[1] > color_channels else None
    return color.expand(-1, 3, -1, -1), alpha, color_channels


class ImageCanvas:
    """One image of a preallocated IMAGE [B, H, W, C] output, filled row band by row band (a pipeline.Canvas).

    So the node holds its float32 output plus a bounded working set, never a second full-size copy.
    """

    def __init__(self, output: torch.Tensor, index: int, color_channels: int):
        self.output, self.index, self.colors = output, index, color_channels

    def convert(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb.mean(1, keepdim=True) if self.colors == 1 else rgb

    def write(self, y0: int, planes: torch.Tensor, first: int = 0) -> None:
        rows = planes[0].movedim(0, -1).to(self.output)
        self.output[self.index, y0:y0 + rows.shape[0], :, first:first + rows.shape[-1]] = rows

    def read(self, y0: int, y1: int) -> torch.Tensor:
        return self.output[self.index, y0:y1, :, :self.colors].movedim(-1, 0)[None].float()


def check_output_fits(image: torch.Tensor, scale: int) -> None:
    """Refuse, before any work, an output IMAGE larger than the memory free for it, naming both sizes.

    The IMAGE is float32 and whole (ComfyUI passes images between nodes in memory), so no tile size
    makes a too-large one fit; the tiled node would otherwise halve its tile down to the floor and
    then blame the tiles. (Files are read by ComfyUI's own loaders, whose size check is Pillow's.)
    """
    batch, height, width, channels = image.shape
    device = mm.intermediate_device()   # where upscale_images puts the output
    need = batch * height * scale * width * scale * channels * 4
    free = mm.get_free_memory(device)
    if need > free:
        raise ValueError(f"TEASR: the x{scale} output of {batch} x {width}x{height} is {batch} x {width * scale}x"
                         f"{height * scale} ({need / 2**30:.1f} GiB as a float32 IMAGE), more than the "
                         f"{free / 2**30:.1f} GiB of memory free on {device}. Upscale fewer images per batch or a "
                         "smaller image (e.g. Upscale Image By 0.5 first), or free memory.")


def upscale_images(model: TEASRModel, image: torch.Tensor, settings: UpscaleSettings, conditioning=None) -> torch.Tensor:
    """Upscale every image of an IMAGE batch into one preallocated IMAGE; one progress bar of steps x tiles x batch.

    Every call also checks ComfyUI's interrupt flag, so Cancel stops within one step of one tile.
    """
    rgb, alpha, color_channels = split_channels(image)
    out_hw = (rgb.shape[-2] * settings.scale, rgb.shape[-1] * settings.scale)
    window = settings.transformer_tile(model.sampling)[0]   # the transformer's window: the attention tile or the tile
    upscaler = model.load((min(window, out_hw[0]), min(window, out_hw[1])) if window else out_hw)
    per_image = count_model_calls(upscaler, tuple(rgb.shape[-2:]), settings)
    total = per_image * rgb.shape[0]
    bar = comfy.utils.ProgressBar(total)
    output = torch.empty(rgb.shape[0], *out_hw, image.shape[-1], dtype=torch.float32, device=mm.intermediate_device())
    for index in range(rgb.shape[0]):
        def progress(done: int, _total: int, first: int = index * per_image) -> None:
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(first + done, total)
        canvas = ImageCanvas(output, index, color_channels)
        upscale_into(upscaler, rgb[index:index + 1], canvas, settings, context_for(model, conditioning, index), progress)
        if alpha is not None:
            for y0, rows in bicubic_rows(alpha[index:index + 1], settings.scale):
                canvas.write(y0, rows, first=color_channels)
    return output


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA/MPS/XPU out-of-memory and host allocation failures (catchable, unlike the OOM killer)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def raise_non_oom(error: BaseException) -> None:
    """Re-raise anything that is not an out-of-memory error (model_management.raise_non_oom came after 0.3.75).

    0.3.75's OOM_EXCEPTION is plain Exception on machines without CUDA, so it cannot be the test.
    """
    if not is_out_of_memory(error):
        raise error
