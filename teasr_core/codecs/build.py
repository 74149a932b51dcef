"""Codecs by name: the one a checkpoint's `codec` config names, or one of this library's by its name."""
from __future__ import annotations

import torch

from .codec import Codec, PixelCodec
from .qwen_vae import CODEC_NAME as QWEN_VAE, load_vae_codec
from .taef2 import TAEF2Codec


def build_codec(name: str, **kwargs) -> Codec:
    """Codec by the name stored in a checkpoint config."""
    if name == "pixel":
        return PixelCodec(**kwargs)
    if name == "taef2":
        return TAEF2Codec(**kwargs)
    raise ValueError(f"unknown codec {name!r}: this library builds 'pixel' and 'taef2'; "
                     "external VAEs (e.g. ComfyUI's) are passed in as objects with encode/decode")


def codec_from_config(codec: dict, device="cpu", vae=None, dtype=None) -> Codec:
    """Build the codec a checkpoint names, computing in `dtype` (default fp32; the pixel codec has no
    weights); an external VAE's latent space needs that VAE's file (`vae`)."""
    kind = codec.get("name")
    if kind == "pixel":
        return PixelCodec(scale=int(codec.get("scale", 8)))
    if kind == "taef2":
        return build_codec("taef2", device=device, dtype=dtype or torch.float32, latent_mean=codec.get("latent_mean"),
                           latent_std=codec.get("latent_std"))
    if kind == QWEN_VAE and vae is not None:
        return load_vae_codec(vae, device=device, dtype=dtype or torch.float32, expected=codec)
    raise ValueError(f"this checkpoint's latents come from an external VAE ({codec.get('vae', kind)!r}); "
                     "pass that VAE's file (--vae on the command line) or a codec (in ComfyUI: connect the VAE "
                     "input of TEASR Loader)")
