"""Latent-space tiling: a tile plan, cosine feathering on interior edges, and a tiled denoiser.

Tiling wraps the denoiser, not the sampler: at every step each tile's velocity is computed on its
own window (with the LR condition cropped alike) and the tiles are blended with feathered weights.
Because the update is linear in the velocity, this equals blending the next latents, and all tiles
stay on one shared trajectory (MultiDiffusion-style), so overlaps agree step after step. Noise is a
function of position (sampling.noise_field), so the result does not depend on tile order or size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import Denoise


@dataclass(frozen=True)
class Tile:
    y0: int
    x0: int
    h: int
    w: int


def _starts(length: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Tile starts along one axis: aligned to `multiple`, the last tile flush with the end."""
    if tile >= length:
        return [0]
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    n = math.ceil((length - tile) / stride) + 1
    last = length - tile
    starts = sorted({min(i * stride, last) for i in range(n)} | {last})
    return starts


def plan_tiles(h: int, w: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Tiles of at most tile x tile latent pixels covering [h, w] with at least `overlap` overlap.

    Sizes and starts are multiples of `multiple` (the patch size) when h and w are.
    """
    if tile <= 0 or overlap < 0:
        raise ValueError(f"tile must be > 0 and overlap >= 0, got {tile}, {overlap}")
    tile = max(multiple, tile // multiple * multiple)
    if overlap >= tile:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
    th, tw = min(tile, h), min(tile, w)
    return [Tile(y, x, th, tw) for y in _starts(h, th, overlap, multiple) for x in _starts(w, tw, overlap, multiple)]


def _ramp(n: int, lo_fade: int, hi_fade: int) -> torch.Tensor:
    """1-D weights: raised-cosine ramps of the given widths at each end, 1 in between."""
    weights = torch.ones(n, dtype=torch.float64)
    for fade, flip in ((lo_fade, False), (hi_fade, True)):
        if fade <= 0:
            continue
        fade = min(fade, n)
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(fade, dtype=torch.float64) + 0.5) / fade)
        if flip:
            weights[n - fade:] = torch.minimum(weights[n - fade:], ramp.flip(0))
        else:
            weights[:fade] = torch.minimum(weights[:fade], ramp)
    return weights


def feather(tile: Tile, h: int, w: int, overlap: int) -> torch.Tensor:
    """[tile.h, tile.w] weights: cosine ramps over `overlap` on interior edges; outer borders stay 1."""
    fade = lambda start, size, length: (overlap if start > 0 else 0, overlap if start + size < length else 0)  # noqa: E731
    wy = _ramp(tile.h, *fade(tile.y0, tile.h, h))
    wx = _ramp(tile.w, *fade(tile.x0, tile.w, w))
    return (wy[:, None] * wx[None, :]).float()


def tiled_denoiser(denoise_window: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Tile], torch.Tensor],
                   tiles: list[Tile], h: int, w: int, overlap: int,
                   on_tile: Callable[[int, Tile], None] | None = None) -> Denoise:
    """A Denoise over the whole latent that evaluates `denoise_window(x_tile, sigma, target, tile)` per tile.

    `on_tile(index, tile)` runs after each tile: progress bars and interrupt checks hook in there.
    """
    weights = [feather(t, h, w, overlap) for t in tiles]

    def denoise(x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x, dtype=torch.float32)
        norm = torch.zeros(h, w, device=x.device)
        for i, (tile, weight) in enumerate(zip(tiles, weights)):
            window = (slice(None), slice(None), slice(tile.y0, tile.y0 + tile.h), slice(tile.x0, tile.x0 + tile.w))
            velocity = denoise_window(x[window], sigma, target, tile)
            weight = weight.to(x.device)
            total[window] += velocity.float() * weight
            norm[window[2:]] += weight
            if on_tile:
                on_tile(i, tile)
        return (total / norm).to(x.dtype)

    return denoise
