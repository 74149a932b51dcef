"""Real-ESRGAN degradation and the training-pair stream: ranges, determinism, resumability, real photos."""
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from train.data import ImageFolder, PairStream, load_rgb8, upsample_lr
from train.degrade import (KERNEL_TYPES, DegradationConfig, degrade, sample_blur_kernels,
                           sample_final_sinc_kernels)

SHARED = Path(os.environ.get("TEASR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TRAIN_POOL = SHARED / "data" / "train_pool"


def _photo_like(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields plus a few hard edges: enough structure for blur, JPEG and noise to act on."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, h // 16, w // 16, generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    image[..., h // 3:h // 2, :] = torch.rand(batch, 3, 1, 1, generator=g)
    return image.clamp(0, 1)


def _is_on_8bit_levels(image: torch.Tensor) -> bool:
    return torch.equal(image, torch.round(image * 255) / 255)


def _check_kernels(kernels: torch.Tensor, sizes: torch.Tensor) -> None:
    torch.testing.assert_close(kernels.sum(dim=(-2, -1)), torch.ones(len(kernels), dtype=kernels.dtype))
    assert kernels.shape[-1] == int(sizes.max())
    axis = torch.arange(kernels.shape[-1]) - kernels.shape[-1] // 2
    for kernel, size in zip(kernels, sizes):
        outside = (axis.abs() > size // 2)
        assert not kernel[outside].any() and not kernel[:, outside].any(), f"weights outside the {size}px support"


@pytest.mark.parametrize("kernel_type", KERNEL_TYPES + ("sinc",))
def test_kernels_integrate_to_one_and_fit_their_size(kernel_type):
    config = DegradationConfig()
    only_this = tuple(float(t == kernel_type) for t in KERNEL_TYPES) if kernel_type != "sinc" else config.kernel_prob
    kernels, sizes = sample_blur_kernels(64, torch.Generator().manual_seed(0), kernel_prob=only_this,
                                         sinc_prob=float(kernel_type == "sinc"), blur_sigma=config.blur_sigma,
                                         betag_range=config.betag_range, betap_range=config.betap_range,
                                         kernel_range=config.kernel_range)
    assert set(sizes.tolist()) <= set(range(7, 22, 2)) and len(set(sizes.tolist())) > 3
    _check_kernels(kernels, sizes)
    if kernel_type.endswith("aniso"):
        assert not torch.allclose(kernels, kernels.transpose(-1, -2))
    else:  # isotropic kernels are symmetric
        torch.testing.assert_close(kernels, kernels.transpose(-1, -2))


def test_skipped_blur_and_final_sinc_are_identity_kernels():
    config = DegradationConfig()
    kernels, sizes = sample_blur_kernels(8, torch.Generator().manual_seed(0), kernel_prob=config.kernel_prob,
                                         sinc_prob=0.5, blur_sigma=config.blur_sigma2,
                                         betag_range=config.betag_range2, betap_range=config.betap_range2,
                                         kernel_range=config.kernel_range, blur_prob=0.0)
    assert sizes.tolist() == [1] * 8 and kernels.shape == (8, 1, 1)
    sinc = sample_final_sinc_kernels(32, torch.Generator().manual_seed(0), prob=0.5, kernel_range=(7, 21))
    identity = (sinc.flatten(1) == 1).any(1)
    assert 0 < int(identity.sum()) < 32
    _check_kernels(sinc, torch.where(identity, 1, sinc.shape[-1]))


def test_config_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="kernel_prob"):
        DegradationConfig(kernel_prob=(0.5, 0.5, 0.5, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="kernel_range"):
        DegradationConfig(kernel_range=(8, 21))


def test_lr_shape_range_levels_and_seed_determinism():
    hr = _photo_like(4, 64, 96)
    lr = degrade(hr, torch.Generator().manual_seed(0))
    assert lr.shape == (4, 3, 16, 24) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1 and _is_on_8bit_levels(lr)
    assert torch.equal(lr, degrade(hr, torch.Generator().manual_seed(0)))
    assert not torch.equal(lr, degrade(hr, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="multiple"):
        degrade(hr[..., :62], torch.Generator())


@pytest.mark.parametrize("overrides", [
    # nothing resized or blurred in stage 2, Gaussian gray noise everywhere
    dict(resize_prob=(0, 0, 1), resize_prob2=(0, 0, 1), second_blur_prob=0.0, final_sinc_prob=0.0,
         gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0, gray_noise_prob=1.0, gray_noise_prob2=1.0),
    # strongest downscale with the biggest kernels: 9 px images smaller than the 10 px kernel padding; Poisson noise
    dict(resize_prob=(0, 1, 0), resize_range=(0.15, 0.15), kernel_range=(21, 21), second_blur_prob=1.0,
         sinc_prob2=1.0, gaussian_noise_prob=0.0, gaussian_noise_prob2=0.0),
    # upscale in both stages
    dict(resize_prob=(1, 0, 0), resize_prob2=(1, 0, 0)),
])
def test_extreme_settings_still_give_valid_lr(overrides):
    lr = degrade(_photo_like(3, 64, 64), torch.Generator().manual_seed(0), replace(DegradationConfig(), **overrides))
    assert lr.shape == (3, 3, 16, 16) and lr.min() >= 0 and lr.max() <= 1 and _is_on_8bit_levels(lr)


def _write_odd_images(folder: Path) -> None:
    """Modes a photo folder can hold, and one image smaller than the crop (it must be upscaled, not skipped)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    (folder / "nested").mkdir()
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).convert("L").save(folder / "nested" / "gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((rng.integers(0, 65536, (80, 70))).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rgb[:40, :50]).save(folder / "small.png")


def test_decoder_handles_16_bit_gray(tmp_path):
    gray16 = np.array([[0, 257, 65535]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g.png")
    assert load_rgb8(tmp_path / "g.png").tolist() == [[[0] * 3, [1] * 3, [255] * 3]]


def test_hr_downscale_removes_grain_and_keeps_the_crop_size(tmp_path):
    """Shrinking by 1/2 before cropping averages pixel-level grain away (std falls ~2x for white
    noise), and photos that end up below the crop are grown back to it."""
    rng = np.random.default_rng(0)
    grainy = (128 + 20 * rng.standard_normal((200, 300, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(grainy).save(tmp_path / "grain.png")
    full, half = ImageFolder(tmp_path)[0], ImageFolder(tmp_path, downscale=0.5)[0]
    assert half.shape == (100, 150, 3) and half.std() < 0.6 * full.std()
    assert ImageFolder(tmp_path, min_side=128, downscale=0.5)[0].shape[0] == 128
    with pytest.raises(ValueError, match="downscale"):
        ImageFolder(tmp_path, downscale=0)


def test_stream_resumes_bit_exactly_across_epochs(tmp_path):
    _write_odd_images(tmp_path)
    stream = PairStream(tmp_path, crop=64, batch_size=4, seed=3)
    for _ in range(2):  # 8 samples from 6 images: the saved state is inside the second epoch
        next(stream)
    state = stream.state_dict()
    lr, hr = next(stream)
    assert hr.shape == (4, 3, 64, 64) and lr.shape == (4, 3, 16, 16)

    resumed = PairStream(tmp_path, crop=64, batch_size=4, seed=99)
    resumed.load_state_dict(state)
    lr_again, hr_again = next(resumed)
    assert torch.equal(hr, hr_again) and torch.equal(lr, lr_again)
    assert resumed.state_dict() == stream.state_dict()


@pytest.mark.skipif(not TRAIN_POOL.is_dir(), reason=f"shared training photos not found at {TRAIN_POOL}")
def test_real_photos_are_degraded_but_keep_their_colours():
    lr, hr = next(PairStream(TRAIN_POOL, crop=128, batch_size=8, seed=0))
    assert lr.shape == (8, 3, 32, 32) and hr.shape == (8, 3, 128, 128) and _is_on_8bit_levels(lr)
    lr_up = upsample_lr(lr)
    assert lr_up.shape == hr.shape and lr_up.min() >= 0 and lr_up.max() <= 1
    psnr = -10 * torch.log10(((lr_up - hr) ** 2).mean(dim=(1, 2, 3)))
    assert torch.isfinite(psnr).all() and psnr.mean() < 40, psnr
    colour_shift = (lr.mean(dim=(2, 3)) - hr.mean(dim=(2, 3))).abs()
    assert colour_shift.max() < 0.1 and colour_shift.mean() < 0.03, colour_shift
