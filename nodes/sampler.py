"""TEASR AnyStep Sampler: the whole image in one piece, any number of steps."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from .common import (CATEGORY, SEARCH_ALIASES, build_settings, check_output_fits, image_output,
                     model_and_image_inputs, optional_inputs, raise_non_oom, sampling_inputs, schema, timesteps_error,
                     upscale_images)


class TEASRAnyStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TEASRAnyStepSampler",
            display_name="TEASR AnyStep Sampler",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Upscale (super-resolution x4) an image with a TEASR model in any number of steps: "
                        "1 step is fastest, more steps restore and enhance more detail. Processes the whole "
                        "image at once; for large images use TEASR Tiled Upscale.",
            inputs=model_and_image_inputs() + sampling_inputs() + optional_inputs(),
            outputs=[image_output()],
        )

    @classmethod
    def validate_inputs(cls, timesteps=None):
        return timesteps_error(timesteps) or True

    @classmethod
    def execute(cls, model, image, steps, seed, mode, shift, start_strength, color_fix, timesteps="",
                end_ratio=None, attention_tile=None, conditioning=None) -> io.NodeOutput:
        settings = build_settings(steps=steps, seed=seed, mode=mode, shift=shift, start_strength=start_strength,
                                  color_fix=color_fix, timesteps=timesteps, end_ratio=end_ratio,
                                  attention_tile=attention_tile)
        check_output_fits(image, settings.scale)
        try:
            return io.NodeOutput(upscale_images(model, image, settings, conditioning))
        except Exception as e:
            raise_non_oom(e)
            raise torch.OutOfMemoryError(
                f"TEASR ran out of memory upscaling a {image.shape[2]}x{image.shape[1]} image in one piece; "
                "use TEASR Tiled Upscale (tile_size 0 picks a tile that fits)") from e
