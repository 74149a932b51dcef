"""Codecs map images to the model's space and back: one small interface, several implementations.

An image is a float tensor [B, 3, H, W] in [0, 1]. A codec's `encode` returns a normalised latent
[B, C, H / scale, W / scale] (roughly zero-mean, unit-variance per channel, which is what the flow
x_t = (1 - s) x0 + s eps assumes), and `decode` inverts it. H and W must be multiples of `scale`.

Large images are encoded and decoded in tiles (`tiled_encode`, `tiled_decode`), so memory follows the
tile, not the image. A codec says how it tiles with two optional attributes, in latent pixels:
`tile_margin` (context computed around each tile and cropped away: enough for a finite receptive
field makes tiles exact) and `tile_overlap` (feathered overlap that hides what still differs, e.g.
per-tile normalisation statistics). A codec with neither is local: any window maps on its own.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..tiling import Rows, Tile, blend_rows, gather, plan_tiles


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
    tile_margin = tile_overlap = 0

    def __init__(self, scale: int = 8):
        self.scale = scale
        self.channels = 3 * scale * scale

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image, self.scale)
        return F.pixel_unshuffle(image * 2 - 1, self.scale)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return (F.pixel_shuffle(latent, self.scale) + 1) / 2


def is_local(codec: Codec) -> bool:
    """Whether any window encodes / decodes exactly on its own (no context, no global statistics)."""
    return not (getattr(codec, "tile_margin", 0) or getattr(codec, "tile_overlap", 0)
                or hasattr(codec, "encode_tiled") or hasattr(codec, "decode_tiled"))


def tiled_map(compute: Callable[[Tile], torch.Tensor], hw: tuple[int, int], tile: int, margin: int, overlap: int,
              scale: int) -> Iterator[Rows]:
    """blend_rows of `compute(window)` over latent tiles, each run on the tile grown by `margin` and cropped back."""
    h, w = hw
    tiles = plan_tiles(h, w, max(tile, overlap + 1), overlap)

    def with_margin(t: Tile) -> torch.Tensor:
        y0, x0 = max(0, t.y0 - margin), max(0, t.x0 - margin)
        y1, x1 = min(h, t.y0 + t.h + margin), min(w, t.x0 + t.w + margin)
        out = compute(Tile(y0, x0, y1 - y0, x1 - x0))
        dy, dx = (t.y0 - y0) * scale, (t.x0 - x0) * scale
        return out[..., dy:dy + t.h * scale, dx:dx + t.w * scale]

    return blend_rows(tiles, with_margin, overlap, scale)


def tiled_encode(codec: Codec, image_window: Callable[[int, int, int, int], torch.Tensor],
                 latent_hw: tuple[int, int], tile: int) -> torch.Tensor:
    """The latent of an image given window by window (`image_window(y0, y1, x0, x1)` in pixels); tile in latent px."""
    s = codec.scale
    encode = lambda t: codec.encode(image_window(t.y0 * s, (t.y0 + t.h) * s, t.x0 * s, (t.x0 + t.w) * s))  # noqa: E731
    return gather(tiled_map(encode, latent_hw, tile, getattr(codec, "tile_margin", 0),
                            getattr(codec, "tile_overlap", 0), 1))


def tiled_decode(codec: Codec, latent: torch.Tensor, tile: int) -> Iterator[Rows]:
    """Image rows of `latent` [B, C, h, w], decoded tile by tile (tile in latent px)."""
    decode = lambda t: codec.decode(latent[..., t.y0:t.y0 + t.h, t.x0:t.x0 + t.w])  # noqa: E731
    return tiled_map(decode, tuple(latent.shape[-2:]), tile, getattr(codec, "tile_margin", 0),
                     getattr(codec, "tile_overlap", 0), codec.scale)
