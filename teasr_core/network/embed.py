"""Timestep embedders and 2-D rotary position embedding, laid out like Qwen-Image's.

The embedder input is sigma in [-1, 1] (scaled by 1000 inside, as Qwen-Image does). A negative
sigma is meaningful: it marks the model's own "fake" flow in self-adversarial training, and the
sinusoid distinguishes it through its odd (sine) half.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256, scale: float = 1000.0,
                         max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim], cos half first (diffusers' flip_sin_to_cos=True, freq shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    """Qwen-Image's `timestep_embedder`: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(torch.nn.functional.silu(self.linear_1(x)))


class TimestepEmbedder(nn.Module):
    """sigma [B] -> embedding [B, dim]; keys `timestep_embedder.linear_{1,2}` as in Qwen-Image."""

    def __init__(self, dim: int, freq_dim: int = 256, device=None, dtype=None):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = TimestepMLP(freq_dim, dim, device=device, dtype=dtype)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(sinusoidal_embedding(sigma, self.freq_dim).to(dtype))


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """ids [B, L, n_axes] -> rotation angles [B, L, head_dim / 2] (axes concatenated in order)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., axis, None].double() * freqs)
    return torch.cat(angles, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, H, L, D] by angles with cos/sin [B, 1, L, D/2]."""
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def image_positions(h_tokens: int, w_tokens: int, device=None) -> torch.Tensor:
    """[h*w, 3] ids (frame 0, row, col) centred on the image, as Qwen-Image numbers them."""
    rows = torch.arange(h_tokens, device=device, dtype=torch.float32) - h_tokens // 2
    cols = torch.arange(w_tokens, device=device, dtype=torch.float32) - w_tokens // 2
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=-1)


def text_positions(n_tokens: int, h_tokens: int, w_tokens: int, device=None) -> torch.Tensor:
    """[n, 3] ids for context tokens: a diagonal that starts past the image's half-extent."""
    start = max(h_tokens // 2, w_tokens // 2)
    return torch.arange(start, start + n_tokens, device=device, dtype=torch.float32)[:, None].expand(-1, 3)
