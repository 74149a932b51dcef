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


OWN_DECODER = "checkpoint"   # codec["decoder"] of a model that carries its own fine-tuned decoder


def codec_from_config(codec: dict, device="cpu", vae=None, dtype=None, tensors: dict | None = None) -> Codec:
    """Build the codec a checkpoint names, computing in `dtype` (default fp32; the pixel codec has no
    weights); an external VAE's latent space needs that VAE's file (`vae`). `tensors`: the codec
    tensors the checkpoint carries (TEASRCheckpoint.codec_tensors), e.g. its own TAEF2 decoder."""
    kind = codec.get("name")
    tensors = tensors or {}
    own_decoder = codec.get("decoder") == OWN_DECODER
    decoder_state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    unexpected = sorted(k for k in tensors if not (own_decoder and kind == "taef2" and k.startswith("decoder.")))
    if unexpected:
        raise ValueError(f"the checkpoint carries codec tensors its codec config {codec.get('name')!r} does not use: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if own_decoder and not decoder_state:
        raise ValueError("the checkpoint's codec config says it carries its own decoder, but the file holds no "
                         "codec.decoder.* tensors (was it stripped or re-saved without them?)")
    if kind == "pixel":
        return PixelCodec(scale=int(codec.get("scale", 8)))
    if kind == "taef2":
        return build_codec("taef2", device=device, dtype=dtype or torch.float32, latent_mean=codec.get("latent_mean"),
                           latent_std=codec.get("latent_std"), decoder_state=decoder_state or None)
    if kind == QWEN_VAE and vae is not None:
        return load_vae_codec(vae, device=device, dtype=dtype or torch.float32, expected=codec)
    raise ValueError(f"this checkpoint's latents come from an external VAE ({codec.get('vae', kind)!r}); "
                     "pass that VAE's file (--vae on the command line) or a codec (in ComfyUI: connect the VAE "
                     "input of TEASR Loader)")
