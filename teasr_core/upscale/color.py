"""Colour correction after upscaling: keep the input's colours, take only detail from the model.

Generative SR can drift in global colour/tone. Both fixes take the reference (the LR image upsampled
to the output size) as the source of truth for colour: "adain" matches per-channel mean/std,
"wavelet" (StableSR / SeedVR style) swaps in the reference's low frequencies wholesale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_METHODS = ("wavelet", "adain", "none")

# 3x3 binomial blur ([1, 2, 1] / 4 outer product): the a-trous B-spline scaling kernel.
_BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel (mean, std) of [B, C, H, W] in fp32, shaped [B, C, 1, 1]."""
    x = x.float()
    return x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True, correction=0)


def adain_apply(image: torch.Tensor, image_moments, reference_moments, eps: float = 1e-6) -> torch.Tensor:
    """`image` with its channel moments swapped for the reference's (fp32)."""
    (x_mean, x_std), (r_mean, r_std) = image_moments, reference_moments
    return (image.float() - x_mean) / x_std.clamp_min(eps) * r_std + r_mean


def adain(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image, per-channel mean/std of `image` [B, C, H, W] set to those of `reference` (fp32)."""
    return adain_apply(image, channel_moments(image), channel_moments(reference), eps)


WAVELET_LEVELS = 5
# Pixels each side that the low-pass reads (sum of the dilations): a band computed with this much
# margin equals the whole-image result on its interior; at the image border the margin is not
# needed because both pad the same border by replication.
WAVELET_RADIUS = 2 ** WAVELET_LEVELS - 1


def wavelet_lowpass(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """Low-frequency residual of an a-trous decomposition of [B, C, H, W]: blur at dilations 1, 2, .., 2^(levels-1).

    Replicate padding is valid for any size (reflect would fail once the dilation reaches the size).
    The high-frequency part is `image - wavelet_lowpass(image)` (the sum of all detail bands).
    """
    x = image.float()
    channels = x.shape[1]
    kernel = _BLUR.to(x.device).expand(channels, 1, 3, 3)
    for level in range(levels):
        d = 2 ** level
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=channels)
    return x


def wavelet_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """High frequencies of `image` + low frequencies of `reference` (both [B, C, H, W]), fp32."""
    x = image.float()
    return x - wavelet_lowpass(x, levels) + wavelet_lowpass(reference, levels)


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    """Give the upscaled `image` [B, 3, H, W] in [0, 1] the colours of `reference` (same shape).

    Returns the image's dtype, clamped to [0, 1]; "none" returns `image` unchanged. Shapes are
    checked for every method so a caller bug shows up whichever method is selected.
    """
    if method not in COLOR_FIX_METHODS:
        raise ValueError(f"unknown colour-fix method {method!r}; choose one of {COLOR_FIX_METHODS}")
    if image.ndim != 4 or image.shape != reference.shape:
        raise ValueError(f"color_fix needs image and reference of the same shape [B, C, H, W], got "
                         f"{tuple(image.shape)} and {tuple(reference.shape)}")
    if method == "none":
        return image
    fixed = adain(image, reference) if method == "adain" else wavelet_fix(image, reference)
    return fixed.clamp(0, 1).to(image.dtype)
