"""NIQE (Mittal et al. 2012), no-reference naturalness, as pyiqa's default variant computes it.

Apart from metrics.py because it is a model of its own: AGGD fits on MSCN coefficients at two scales and
a Gaussian distance to the pristine model (MATLAB's modelparameters.mat as basicsr ships it, converted
by metrics.CONVERTERS into the weight cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from . import weights
from .metrics import NIQE_WEIGHTS


# AGGD shape search grid 0.2:0.001:10. pyiqa builds it in float32 and then widens it; we do the same so the
# fitted shapes land on identical grid values.
_AGGD_SHAPES = torch.arange(0.2, 10.001, 0.001, dtype=torch.float32).double()
_AGGD_RATIOS = torch.exp(2 * torch.lgamma(2 / _AGGD_SHAPES) - torch.lgamma(1 / _AGGD_SHAPES)
                         - torch.lgamma(3 / _AGGD_SHAPES))  # increasing in the shape


def _nearest_grid_index(table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """argmin_i |table[i] - v| for an increasing `table` (first index on ties), without a [N, len(table)] matrix.
    NaN values get index 0, like an argmin over an all-NaN row."""
    hi = torch.searchsorted(table, values.contiguous()).clamp(1, len(table) - 1)
    lo = hi - 1
    index = torch.where(values - table[lo] <= table[hi] - values, lo, hi)
    return torch.where(values.isnan(), torch.zeros_like(index), index)


def _aggd_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moment-matching fit of an asymmetric generalised Gaussian over the last two dims: (shape, left, right scale)."""
    dims = (-2, -1)
    sq = x * x
    negative = x < 0
    sq_left, sq_all = torch.where(negative, sq, 0).sum(dims), sq.sum(dims)
    left_std = (sq_left / negative.sum(dims)).sqrt()
    right_std = ((sq_all - sq_left) / (x > 0).sum(dims)).sqrt()  # zeros count on neither side
    gamma = left_std / right_std
    r_hat = x.abs().mean(dims) ** 2 / (sq_all / (x.shape[-1] * x.shape[-2]))
    r_norm = r_hat * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
    shape = _AGGD_SHAPES.to(x.device)[_nearest_grid_index(_AGGD_RATIOS.to(x.device), r_norm)]
    to_scale = torch.exp(torch.lgamma(1 / shape) - torch.lgamma(3 / shape)).sqrt()
    return shape, left_std * to_scale, right_std * to_scale


def _niqe_block_features(blocks: torch.Tensor) -> torch.Tensor:
    """The 18 NIQE features [..., 18] of MSCN blocks [..., h, w]: AGGD of the coefficients, and of their products
    with the (circularly shifted) right, lower and two diagonal neighbours."""
    shape, left, right = _aggd_fit(blocks)
    features = [shape, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        shape, left, right = _aggd_fit(blocks * torch.roll(blocks, shift, dims=(-2, -1)))
        mean = (right - left) * torch.exp(torch.lgamma(2 / shape) - torch.lgamma(1 / shape))
        features += [shape, mean, left, right]
    return torch.stack(features, -1)


def _pyiqa_luma255(img: torch.Tensor) -> torch.Tensor:
    """round(255 * (0.299 R + 0.587 G + 0.114 B)) [B, 1, H, W] (float64), evaluated in float32 exactly as pyiqa does.

    For 8-bit inputs about 0.1% of pixels have an exact luma of k + 0.5; which way they round depends on float32
    rounding, and NIQE moves by up to ~0.005 with them. pyiqa evaluates the dot product as a multiply followed by two
    fused multiply-adds (checked against its CPU matmul for all 2^24 8-bit colours); we spell those steps out in
    float64 so the result does not depend on the BLAS or the device.
    """
    r, g, b = img.float().double().unbind(1)
    w_r, w_g, w_b = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).double().tolist()
    acc = (r * w_r).float()
    acc = (g * w_g + acc.double()).float()
    acc = (b * w_b + acc.double()).float()
    return torch.round((acc.double() * 255).float()).double().unsqueeze(1)


def _mscn_window() -> torch.Tensor:
    """pyiqa's 7x7 Gaussian (sigma 7/6) as [1, 1, 7, 7] float64, rounded through float32 as pyiqa stores it.

    The rounding leaves it summing to 1 + 1.1e-8. In perfectly flat areas that decides the sign of the otherwise
    zero MSCN coefficients, and NIQE is sensitive to those signs (0.02 on a photo with 2% flat area)."""
    x = torch.arange(7, dtype=torch.float64) - 3
    window = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    return (window / window.sum()).float().double().view(1, 1, 7, 7)


def _mscn(y: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted contrast-normalised coefficients: local Gaussian mean/std, replicated edges."""
    window = _mscn_window().to(y)
    mu = F.conv2d(F.pad(y, (3, 3, 3, 3), mode="replicate"), window)
    var = (F.conv2d(F.pad(y * y, (3, 3, 3, 3), mode="replicate"), window) - mu ** 2).abs()
    return (y - mu) / ((var + torch.finfo(y.dtype).eps).sqrt() + 1)


# MATLAB's antialiased bicubic kernel for a x0.5 resize: Keys (a = -0.5) stretched x2, 8 taps at -3.5 .. 3.5 input
# pixels from the output centre, normalised. All weights are short binary fractions, exact in float32.
_HALF_TAPS = torch.tensor([-0.01171875, -0.03515625, 0.11328125, 0.43359375,
                           0.43359375, 0.11328125, -0.03515625, -0.01171875], dtype=torch.float32)


def _bicubic_half(x: torch.Tensor) -> torch.Tensor:
    """MATLAB imresize(x, 0.5) (bicubic, antialiased, edges mirrored with the edge pixel repeated) of float32
    [N, 1, H, W] with even H, W: rows first, then columns.

    NIQE is sensitive to 1-ulp differences here wherever the half-size image has exactly flat patches (up to 0.004 on
    our test photos), so the float32 arithmetic follows pyiqa's: products rounded, then summed as PyTorch reduces its
    10-tap axis (8 taps plus 2 zero-weight ones): four interleaved partial sums, added in turn. Checked against 15
    published pyiqa values; summing left to right instead is off by up to 6e-4.
    """
    taps = _HALF_TAPS.to(x.device)
    for dim in (-2, -1):
        x = x.transpose(dim, -1)
        n = x.shape[-1]
        padded = torch.cat([x[..., :3].flip(-1), x, x[..., -3:].flip(-1)], -1)
        p = [padded[..., t:t + n:2] * w for t, w in enumerate(taps)]  # p[t]: input pixel 2i - 3 + t
        x = ((((p[3] + p[7]) + (p[0] + p[4])) + (p[1] + p[5])) + (p[2] + p[6])).transpose(dim, -1)
    return x


def _to_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1, H, W] (H, W multiples of size) -> [B, n_blocks, size, size]."""
    b, _, h, w = x.shape
    return x.reshape(b, h // size, size, w // size, size).transpose(2, 3).reshape(b, -1, size, size)


def niqe(img: torch.Tensor, pristine: dict[str, torch.Tensor] | None = None, block: int = 96) -> torch.Tensor:
    """NIQE [B] (float64, lower is more natural) as pyiqa's default 'niqe' computes it.

    Integer luma (pyiqa's YIQ Y, see `_pyiqa_luma255`); crop to whole `block`s; 18 features per block at full and
    half scale (MATLAB bicubic, in float32 like pyiqa); distance of the Gaussian fitted to them from the pristine
    model (MATLAB's modelparameters.mat, as shipped by basicsr). Features undefined in flat blocks (NaN) are left
    out as pyiqa leaves them out: per feature from the mean, whole blocks from the covariance.

    Ties in the luma rounding make the result depend on the last bit of the float input (by up to ~0.005): scale
    8-bit images as `uint8 / 255`, like pyiqa's image loader. (OSEDiff's published values came from images scaled on
    the GPU, where PyTorch multiplies by float32(1/255) instead; `uint8 * (torch.tensor(1.0) / 255)` reproduces them.)
    """
    if pristine is None:
        pristine = load_file(str(weights.weights_path(NIQE_WEIGHTS)))
    y = _pyiqa_luma255(img)
    h, w = (s // block * block for s in y.shape[-2:])
    if h == 0 or w == 0:
        raise ValueError(f"NIQE needs at least {block}x{block} pixels, got {tuple(img.shape[-2:])}")
    y = y[..., :h, :w]
    features = []
    for size in (block, block // 2):
        features.append(_niqe_block_features(_to_blocks(_mscn(y), size)))
        y = _bicubic_half((y / 255).float()).double() * 255
    features = torch.cat(features, -1)  # [B, n_blocks, 36]

    valid = ~features.isnan()
    mu = torch.where(valid, features, 0).sum(1) / valid.sum(1)  # per-feature nan-mean
    complete = valid.all(-1, keepdim=True)  # covariance from rows without any NaN
    count = complete.sum(1, keepdim=True)
    row_mean = torch.where(complete, features, 0).sum(1, keepdim=True) / count
    centred = torch.where(complete, features - row_mean, 0)
    cov = centred.transpose(1, 2) @ centred / (count - 1)

    mu_p = pristine["mu_pris_param"].to(mu)
    cov_p = pristine["cov_pris_param"].to(mu)
    diff = (mu_p - mu).unsqueeze(-1)
    return (diff.transpose(1, 2) @ torch.linalg.pinv((cov_p + cov) / 2) @ diff).flatten().sqrt()
