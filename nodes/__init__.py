"""The ComfyUI adapters of teasr_core (V3 API): imported only by ComfyUI, via comfy_entrypoint."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .loader import TEASRLoader, register_model_folder
from .sampler import TEASRAnyStepSampler
from .tiled import TEASRTiledUpscale


class TEASRExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TEASRLoader, TEASRAnyStepSampler, TEASRTiledUpscale]
