"""The ComfyUI adapters of teasr_core (V3 API): imported only by ComfyUI, via comfy_entrypoint."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .loader import TEASRLoader, register_model_folder
from .sampler import TEASRAnyStepSampler
from .text_features import TEASRSaveTextFeatures
from .tiled import TEASRTiledUpscale


class TEASRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folder()   # here, not in on_load: ComfyUI 0.3.75 defines on_load but never awaits it
        return [TEASRLoader, TEASRAnyStepSampler, TEASRTiledUpscale, TEASRSaveTextFeatures]
