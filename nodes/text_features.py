"""TEASR Save Text Features: CONDITIONING -> the trainer's `context_file` (safetensors, `context` [T, D])."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

import folder_paths

from ..teasr_core.formats.text_features import save_text_features
from .common import CATEGORY, schema


class TEASRSaveTextFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TEASRSaveTextFeatures",
            display_name="TEASR Save Text Features",
            category=CATEGORY,
            search_aliases=["text features", "context file", "empty prompt", "teasr training"],
            description="Saves text conditioning (e.g. Qwen-Image's text encoder on the empty prompt) as a "
                        "safetensors file in the output folder: the `context_file` of TEASR's trainer "
                        "(python -m train.distill --context-file FILE). Feed the same conditioning to the "
                        "TEASR upscale nodes at inference.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Text conditioning from the base model's text encoder "
                                                              "(CLIP Text Encode); only its first prompt is saved."),
                io.String.Input("filename_prefix", default="TEASR/text_features",
                                tooltip="File name prefix under the output folder; a counter and .safetensors "
                                        "are appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, conditioning, filename_prefix) -> io.NodeOutput:
        context = conditioning[0][0][0]     # first prompt's [T, D] of [[tensor [B, T, D], {...}], ...]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        path = save_text_features(os.path.join(folder, f"{name}_{counter:05}_.safetensors"), context)
        return io.NodeOutput(ui=ui.PreviewText(f"{os.path.join(subfolder, path.name)}: {context.shape[0]} tokens "
                                               f"x {context.shape[1]} features"))
