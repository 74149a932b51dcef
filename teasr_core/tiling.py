"""Tiling: tile plans, cosine feathering on interior edges, and row streaming of blended tiles.

Every stage of an upscale that touches the full image works on tiles in raster order. `blend_rows`
computes one row of tiles at a time, blends overlaps with feathered weights and hands on the rows
that no later tile touches, so a stage holds about one row of tiles, never the whole image; the
next stage reads them through a `RowStream`, which keeps only the rows it still needs. The sampler
uses it per step on velocities: the update is linear in the velocity, so blending velocities equals
blending the next latents, and all tiles stay on one shared trajectory (MultiDiffusion-style). Noise
is a function of position (sampling.noise_field), so results do not depend on tile order or size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch


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


Rows = tuple[int, torch.Tensor]   # (first row, rows [B, C, h, W]) of a streamed image or latent


def blend_rows(tiles: list[Tile], compute: Callable[[Tile], torch.Tensor], overlap: int, scale: int = 1,
               on_tile: Callable[[int, Tile], None] | None = None) -> Iterator[Rows]:
    """Feather-blend `compute(tile)` over a raster-ordered tile plan, yielding finished rows as they complete.

    Tiles are in input units; `compute` returns [B, C, tile.h * scale, tile.w * scale] (scale 8 for a
    codec's decode) and the feather spans overlap * scale output rows / columns. Rows are handed on
    (float32) once the tile row that finishes them is done, before the next tile row is computed.
    """
    h, w = max(t.y0 + t.h for t in tiles), max(t.x0 + t.w for t in tiles)
    starts = sorted({t.y0 for t in tiles})
    total = norm = None
    top = 0                                   # output row of total[..., 0, :]
    index = 0
    for k, y0 in enumerate(starts):
        while index < len(tiles) and tiles[index].y0 == y0:
            tile = tiles[index]
            out = compute(tile).float()
            weight = feather(Tile(tile.y0 * scale, tile.x0 * scale, tile.h * scale, tile.w * scale),
                             h * scale, w * scale, overlap * scale).to(out.device)
            bottom = (tile.y0 + tile.h) * scale
            if total is None:
                total = out.new_zeros(*out.shape[:2], 0, w * scale)
                norm = out.new_zeros(0, w * scale)
            if bottom - top > total.shape[-2]:
                grow = bottom - top - total.shape[-2]
                total = torch.cat([total, total.new_zeros(*total.shape[:2], grow, total.shape[-1])], -2)
                norm = torch.cat([norm, norm.new_zeros(grow, norm.shape[-1])])
            rows = slice(tile.y0 * scale - top, bottom - top)
            cols = slice(tile.x0 * scale, (tile.x0 + tile.w) * scale)
            total[..., rows, cols] += out * weight
            norm[rows, cols] += weight
            if on_tile:
                on_tile(index, tile)
            index += 1
        done = (starts[k + 1] if k + 1 < len(starts) else h) * scale - top
        yield top, total[..., :done, :] / norm[:done]
        total, norm, top = total[..., done:, :], norm[done:], top + done


def gather(rows: Iterable[Rows]) -> torch.Tensor:
    """The whole tensor of a row stream (for stages that need global statistics, e.g. TAEF2's norms)."""
    return torch.cat([chunk for _, chunk in rows], -2)


class RunningMoments:
    """channel_moments of an image seen one row band at a time (float64 sums), for tiled adain, TAEF2's global norms."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.count += x.shape[-2] * x.shape[-1]
        self.total = self.total + x.sum((2, 3), keepdim=True)
        self.squares = self.squares + (x * x).sum((2, 3), keepdim=True)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean.float(), (self.squares / self.count - mean * mean).clamp_min(0).sqrt().float()


class RowStream:
    """Random access to the rows of a stream still needed: pulls chunks on demand, drops released rows."""

    def __init__(self, rows: Iterable[Rows]):
        self._source = iter(rows)
        self._chunks: list[Rows] = []
        self._end = 0

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Rows [y0, y1) (y1 clipped to the stream's end); y0 must not be released yet."""
        while self._end < y1:
            chunk = next(self._source, None)
            if chunk is None:
                break
            self._chunks.append(chunk)
            self._end = chunk[0] + chunk[1].shape[-2]
        parts = [c[..., max(y0 - s, 0):max(min(y1 - s, c.shape[-2]), 0), :]
                 for s, c in self._chunks if s < y1 and s + c.shape[-2] > y0]
        if not parts or self._chunks[0][0] > y0:
            raise IndexError(f"rows {y0}..{y1} are not in the stream (released, or past its end)")
        return parts[0] if len(parts) == 1 else torch.cat(parts, -2)

    def release(self, y: int) -> None:
        """Rows above y are no longer needed."""
        self._chunks = [c for c in self._chunks if c[0] + c[1].shape[-2] > y]
