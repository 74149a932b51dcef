"""Codecs map images to the model's latent space and back: the Codec interface, the pixel codec and
tiled encode/decode (codec.py), TAEF2 (taef2.py), the Qwen-Image VAE run by ComfyUI's implementation
(qwen_vae.py), and building the codec a checkpoint names (build.py).

Imports teasr_core.tiling and teasr_core.safetensors_io only.
"""
