"""Codecs map images to the model's space and back: one small interface, several implementations.

An image is a float tensor [B, 3, H, W] in [0, 1]. A codec's `encode` returns a normalised latent
[B, C, H / scale, W / scale] (roughly zero-mean, unit-variance per channel, which is what the flow
x_t = (1 - s) x0 + s eps assumes), and `decode` inverts it. H and W must be multiples of `scale`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class Codec(Protocol):
    name: str        # stored in checkpoints ("pixel", "taef2", or an external VAE id)
    channels: int    # latent channels C
    scale: int       # image pixels per latent pixel along each axis

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


def check_image(image: torch.Tensor, scale: int) -> None:
    """Reject inputs a codec cannot map losslessly, with the shape in the message."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image batch [B, 3, H, W], got shape {tuple(image.shape)}")
    if image.shape[-2] % scale or image.shape[-1] % scale:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of the codec scale {scale}")


class PixelCodec:
    """Lossless space-to-depth of the image: no weights, so a pixel model is self-contained.

    [0, 1] is mapped to [-1, 1] so the data has a scale comparable to the unit-variance noise.
    """

    name = "pixel"

    def __init__(self, scale: int = 8):
        self.scale = scale
        self.channels = 3 * scale * scale

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image, self.scale)
        return F.pixel_unshuffle(image * 2 - 1, self.scale)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return (F.pixel_shuffle(latent, self.scale) + 1) / 2


def build_codec(name: str, **kwargs) -> Codec:
    """Codec by the name stored in a checkpoint config."""
    if name == "pixel":
        return PixelCodec(**kwargs)
    if name == "taef2":
        from .taef2 import TAEF2Codec
        return TAEF2Codec(**kwargs)
    raise ValueError(f"unknown codec {name!r}: this library builds 'pixel' and 'taef2'; "
                     "external VAEs (e.g. ComfyUI's) are passed in as objects with encode/decode")
