"""TEASR for ComfyUI: any-step diffusion-transformer x4 super-resolution (V3 node pack).

Imports nothing from ComfyUI at module level: pytest imports this file while collecting tests/,
where `comfy_api` does not exist. ComfyUI awaits `comfy_entrypoint` after loading it.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import TEASRExtension
    return TEASRExtension()
