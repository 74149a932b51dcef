"""Colour fix: adain matches channel statistics, wavelet swaps low frequencies, both undo a colour cast."""
import pytest
import torch
import torch.nn.functional as F

from teasr_core.upscale.color import COLOR_FIX_METHODS, color_fix, wavelet_lowpass


def layers(seed: int, size=(128, 128)):
    """Smooth colour field (bilinear from 2x2) and fine zero-mean detail, [2, 3, H, W] each; sum stays in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    smooth = 0.3 + 0.4 * F.interpolate(torch.rand(2, 3, 2, 2, generator=g), size=size, mode="bilinear",
                                       align_corners=True)
    detail = 0.05 * torch.randn(2, 3, *size, generator=g)
    return smooth, detail


def psnr(a, b):
    return (-10 * torch.log10(((a - b) ** 2).mean())).item()


def highpass(x):
    """x minus its 3x3 box average: the finest detail only."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_methods_and_none_is_identity():
    assert COLOR_FIX_METHODS == ("wavelet", "adain", "none")
    image, reference = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert torch.equal(color_fix(image, reference, "none"), image)


def test_adain_matches_reference_statistics():
    smooth_a, detail_a = layers(0)
    smooth_b, detail_b = layers(1)
    image, reference = smooth_a + detail_a, 0.8 * (smooth_b + detail_b) + 0.1
    out = color_fix(image, reference, "adain")
    assert 0 < out.min() and out.max() < 1                  # no clamping, so the statistics are exact
    assert torch.allclose(out.mean((2, 3)), reference.mean((2, 3)), atol=1e-4)
    assert torch.allclose(out.std((2, 3), correction=0), reference.std((2, 3), correction=0), atol=1e-4)


def test_wavelet_takes_low_frequencies_from_reference_and_detail_from_image():
    smooth_a, detail_a = layers(0)
    smooth_b, detail_b = layers(1)
    image, reference = smooth_a + detail_a, smooth_b + detail_b
    out = color_fix(image, reference, "wavelet")
    assert 0 < out.min() and out.max() < 1
    # By construction: output = (image - low(image)) + low(reference).
    assert torch.allclose(out - wavelet_lowpass(reference), image - wavelet_lowpass(image), atol=1e-5)
    # Low frequencies (16x16 block means) are the reference's, not the image's.
    coarse = lambda x: F.avg_pool2d(x, 16)
    assert (coarse(out) - coarse(reference)).abs().mean() < 0.01 < (coarse(image) - coarse(reference)).abs().mean()
    # The finest detail is the image's, not the reference's.
    assert (highpass(out) - highpass(image)).abs().mean() < 1e-3 < (highpass(reference) - highpass(image)).abs().mean()
    # Together: the image's detail on the reference's colour field.
    assert (out - smooth_b - detail_a).abs().mean() < 0.01


@pytest.mark.parametrize("shape", [(1, 3, 64, 96), (2, 1, 5, 40)])   # smaller than the widest dilation too
def test_wavelet_lowpass_is_the_dilated_binomial_blur(shape):
    """The shifted-add passes equal the textbook a-trous step: a depthwise 3x3 [1,2,1]x[1,2,1]/16 convolution
    at dilations 1..16 on replicate-padded input."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected, kernel = x, (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16)
    for level in range(5):
        d = 2 ** level
        expected = F.conv2d(F.pad(expected, (d, d, d, d), mode="replicate"),
                            kernel.expand(shape[1], 1, 3, 3), dilation=d, groups=shape[1])
    assert torch.allclose(wavelet_lowpass(x), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_colour_cast_is_corrected(method):
    smooth, detail = layers(2)
    original = smooth + detail
    gain, offset = torch.tensor([1.1, 0.9, 1.0]).view(1, 3, 1, 1), torch.tensor([0.04, -0.03, 0.06]).view(1, 3, 1, 1)
    shifted = original * gain + offset
    assert 0 < shifted.min() and shifted.max() < 1
    before, after = psnr(shifted, original), psnr(color_fix(shifted, original, method), original)
    assert after > 35 and after > before + 15, (before, after)


@pytest.mark.parametrize("method", COLOR_FIX_METHODS)
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (2, 1)])
def test_tiny_inputs(method, size):
    image, reference = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
    out = color_fix(image, reference, method)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    if size == (1, 1) and method != "none":                # a single pixel's colour is all low frequency
        assert torch.allclose(out, reference, atol=1e-6)


def test_dtype_is_kept():
    image, reference = torch.rand(1, 3, 16, 16, dtype=torch.float16), torch.rand(1, 3, 16, 16, dtype=torch.float16)
    for method in ("adain", "wavelet"):
        assert color_fix(image, reference, method).dtype == torch.float16


def test_errors():
    image = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown colour-fix method 'histogram'"):
        color_fix(image, image, "histogram")
    for method in COLOR_FIX_METHODS:
        with pytest.raises(ValueError, match="same shape"):
            color_fix(image, torch.rand(1, 3, 8, 9), method)
    with pytest.raises(ValueError, match="same shape"):
        color_fix(image[0], image[0], "adain")
