"""TEASR Tiled Upscale: any image size; tiles sized from free memory, halved on out-of-memory."""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from .common import (CATEGORY, SEARCH_ALIASES, build_settings, check_output_fits, image_output,
                     model_and_image_inputs, optional_inputs, raise_non_oom, sampling_inputs, schema, timesteps_error,
                     upscale_images)
from .model import TEASRModel

TILE_FLOOR = 128   # output px: below this the overlap eats the tile and OOM means memory is simply too short
log = logging.getLogger("teasr")


def auto_tile_size(model: TEASRModel, out_hw: tuple[int, int]) -> int | None:
    """The largest square tile (output px) whose activations fit the budget; None = the whole image fits."""
    model.load(out_hw)   # weights first: the budget is what stays free next to them
    budget = model.activation_budget()
    tile = None
    if model.window_bytes(*out_hw) > budget:
        a = model.alignment
        tile = max(out_hw) // a * a
        while tile > TILE_FLOOR and model.window_bytes(tile, tile) > budget:
            tile -= a
        tile = max(tile, TILE_FLOOR)
    window = (tile, tile) if tile else out_hw
    log.info("TEASR: %dx%d output, %s, %.2f GB of activations per window, budget %.2f GB", out_hw[1], out_hw[0],
             f"tiles of {tile} px" if tile else "untiled", model.window_bytes(*window) / 2**30, budget / 2**30)
    return tile


class TEASRTiledUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TEASRTiledUpscale",
            display_name="TEASR Tiled Upscale",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Upscale (super-resolution x4) images of any size with a TEASR model in any number of "
                        "steps. The image is sampled in overlapping tiles that share one trajectory and are "
                        "blended with cosine-feathered overlaps (no seams); tile_size 0 picks the largest tile "
                        "that fits in free memory, and an out-of-memory error halves the tile and retries.",
            inputs=model_and_image_inputs() + sampling_inputs() + [
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=64,
                             tooltip="Tile side in output pixels. 0 = auto: the whole image if it fits in "
                                     "memory, else the largest tile that does."),
                io.Int.Input("tile_overlap", default=128, min=0, max=1024, step=16,
                             tooltip="Overlap between neighbouring tiles in output pixels, blended with a "
                                     "cosine ramp. More overlap: smoother joins, more compute."),
            ] + optional_inputs(),
            outputs=[image_output()],
        )

    @classmethod
    def validate_inputs(cls, timesteps=None):
        return timesteps_error(timesteps) or True

    @classmethod
    def execute(cls, model, image, steps, seed, mode, shift, start_strength, color_fix, tile_size, tile_overlap,
                timesteps="", end_ratio=None, attention_tile=None, conditioning=None) -> io.NodeOutput:
        settings = build_settings(steps=steps, seed=seed, mode=mode, shift=shift, start_strength=start_strength,
                                  color_fix=color_fix, timesteps=timesteps, end_ratio=end_ratio, attention_tile=attention_tile,
                                  tile_overlap=tile_overlap)
        check_output_fits(image, settings.scale)
        out_hw = (image.shape[1] * settings.scale, image.shape[2] * settings.scale)
        tile = tile_size or auto_tile_size(model, out_hw)
        while True:
            try:
                return io.NodeOutput(upscale_images(model, image, replace(settings, tile=tile), conditioning))
            except Exception as e:
                raise_non_oom(e)
                smaller = (tile or max(out_hw)) // 2 // model.alignment * model.alignment
                if smaller < TILE_FLOOR:
                    raise torch.OutOfMemoryError(
                        f"TEASR ran out of memory even with {tile or max(out_hw)} px tiles. Free memory (unload other models, "
                        "close other programs), load the model with dtype bf16/fp16 or fp8_base, or upscale "
                        "fewer images per batch.") from e
                log.warning("TEASR: out of memory with %s; retrying with %d px tiles",
                            f"{tile} px tiles" if tile else "the whole image", smaller)
            tile = smaller
            mm.soft_empty_cache()
