"""TEASR core: a plain-PyTorch library (no ComfyUI imports) for any-step dual-branch DiT super-resolution.

Rooms, lowest first; each imports only the ones listed for it (tests/test_import_graph.py holds them
to it, and to no import circles and no borrowed underscore names):

- `tiling`, `sampling`, `safetensors_io` - helpers more than one room needs: tile plans and
  feathered row streams; σ grids, flow-map samplers and position-seeded noise; reading weight
  files without trusting them. They import nothing of teasr_core.
- `network/` - the dual-branch DiT: model, DualLoRA layers, embeddings. Nothing of teasr_core.
- `codecs/` - image <-> latent: the pixel codec, TAEF2, the Qwen-Image VAE, tiled encode/decode.
  Imports tiling, safetensors_io.
- `formats/` - weight files: our checkpoints, Qwen-Image bases, the authors' dual-LoRA files, text
  features. Imports network, sampling, safetensors_io, codecs (the Qwen-Image VAE's config).
- `upscale/` - the one upscale path: pipeline, colour fix, image files, the allocator setting.
  Imports codecs, formats, network, sampling, tiling.
- `eval/` - metrics, baselines and the eval harness; off the upscale path. Imports codecs, upscale.
- `__main__` - the command line; may import every room.
"""
__version__ = "0.1.0"
