"""Codecs: the pixel codec is exactly invertible; TAEF2 loads strictly, round-trips real photos well,
gives roughly unit-normal latents and back-propagates through decode."""
import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from teasr_core.codecs.build import build_codec
from teasr_core.codecs.codec import Codec, PixelCodec
from teasr_core.codecs.taef2 import (BUNDLED_WEIGHTS, LR_HEAD_FILE, WEIGHT_FILES, TAEF2Codec, default_weights_dir,
                                    make_lr_head)
from teasr_core.tiling import gather

SHARED = Path(os.environ.get("TEASR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TAEF2_DIR = SHARED / "weights" / "taef2"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared folder {SHARED} absent")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR [B] of images in [0, 1]."""
    return -10 * torch.log10(((a - b) ** 2).mean((1, 2, 3)))


@pytest.mark.parametrize("scale", [1, 4, 8])
def test_pixel_round_trip_is_exact(scale):
    codec = PixelCodec(scale)
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    latent = codec.encode(image)
    assert latent.shape == (2, 3 * scale * scale, 16 // scale, 24 // scale)
    assert torch.allclose(codec.decode(latent), image, atol=1e-6, rtol=0)


def test_pixel_rejects_bad_inputs():
    codec = build_codec("pixel", scale=8)
    assert isinstance(codec, Codec)
    with pytest.raises(ValueError, match="multiple of the codec scale 8"):
        codec.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="RGB"):
        codec.encode(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec("sdxl")


def test_taef2_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEASR_TAEF2_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        TAEF2Codec()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "taef2_encoder.safetensors" in message and "taef2_decoder.safetensors" in message
    assert "madebyollin/taesd" in message


@needs_shared
def test_bundled_taef2_weights_are_the_published_ones():
    """The pack ships TAEF2 so users need no download; the copy must be the reference files, unchanged."""
    bundled = default_weights_dir()
    assert bundled == BUNDLED_WEIGHTS and (bundled / "LICENSE").read_bytes() == (TAEF2_DIR / "LICENSE").read_bytes()
    for name in ("taef2_encoder.safetensors", "taef2_decoder.safetensors"):
        assert (bundled / name).read_bytes() == (TAEF2_DIR / name).read_bytes(), name


@pytest.fixture(scope="module")
def taef2():
    if not SHARED.is_dir():
        pytest.skip(f"shared folder {SHARED} absent")
    return build_codec("taef2", weights_dir=TAEF2_DIR)


@needs_shared
def test_taef2_loads_strictly(taef2, tmp_path):
    assert isinstance(taef2, Codec) and (taef2.name, taef2.channels, taef2.scale) == ("taef2", 32, 8)
    for net, part in ((taef2.encoder, "encoder"), (taef2.decoder, "decoder")):
        state = load_file(str(TAEF2_DIR / f"taef2_{part}.safetensors"))
        assert set(net.state_dict()) == set(state)
        assert all(torch.equal(net.state_dict()[k], v.float()) for k, v in state.items())
        assert not any(p.requires_grad for p in net.parameters())
    # A file with one key renamed is refused, naming both the missing and the unexpected key.
    state = load_file(str(TAEF2_DIR / "taef2_encoder.safetensors"))
    state["14.weight_renamed"] = state.pop("14.weight")
    save_file(state, str(tmp_path / "taef2_encoder.safetensors"))
    (tmp_path / "taef2_decoder.safetensors").write_bytes((TAEF2_DIR / "taef2_decoder.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"missing keys \['14.weight'\], unexpected keys \['14.weight_renamed'\]"):
        TAEF2Codec(weights_dir=tmp_path)


@needs_shared
def test_taef2_round_trip_and_latent_stats(taef2):
    files = sorted((SHARED / "data" / "RealSR_crop128" / "hr").glob("*.png"))[:3]
    crops = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)[:, 128:384, 128:384]
             for f in files]
    image = torch.stack(crops).float() / 255                      # [3, 3, 256, 256]
    with torch.no_grad():
        latent = taef2.encode(image)
        decoded = taef2.decode(latent)
    assert latent.shape == (3, 32, 32, 32) and decoded.shape == image.shape
    scores = psnr(decoded, image)
    print(f"TAEF2 round-trip PSNR on {[f.name for f in files]}: {scores.tolist()} (mean {scores.mean():.2f} dB)")
    assert (scores > 30).all()
    mean, std = latent.mean((0, 2, 3)), latent.std((0, 2, 3))
    assert mean.abs().mean() < 0.3
    assert 0.6 < std.mean() < 1.5


@needs_shared
def test_taef2_decode_is_differentiable_and_checks_shapes(taef2):
    latent = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    image = taef2.decode(latent)
    assert image.shape == (1, 3, 32, 48) and 0 <= image.min() and image.max() <= 1
    image.square().mean().backward()
    assert latent.grad is not None and torch.isfinite(latent.grad).all() and latent.grad.abs().sum() > 0
    # The nets apply ReLUs and residual adds in place: their gradients still match finite differences.
    decoder, encoder = (copy.deepcopy(net).double().requires_grad_(False) for net in (taef2.decoder, taef2.encoder))
    small = torch.randn(1, 32, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(decoder, (small,), atol=1e-6)
    pixels = torch.rand(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(encoder, (pixels,), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the codec scale 8"):
        taef2.encode(torch.rand(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"latent \[B, 32, h, w\]"):
        taef2.decode(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="32 values"):
        TAEF2Codec(weights_dir=TAEF2_DIR, latent_mean=[0.0] * 16)


@needs_shared
def test_taef2_in_bf16_agrees_with_fp32_whole_and_tiled(taef2):
    """A bf16 codec (the default where bf16 is native) stays within a rounding step of the fp32 one.

    Its first/last layers stay fp32, so latents and pixels come out in float32; the tiled paths (whole-image
    norm statistics, float32 blending) take the bf16 nets too. Holds on any CPU: bf16 is emulated where not native.
    """
    half = build_codec("taef2", weights_dir=TAEF2_DIR, dtype=torch.bfloat16)
    hr = sorted((SHARED / "data" / "RealSR_crop128" / "hr").glob("*.png"))[0]
    image = torch.from_numpy(np.array(Image.open(hr).convert("RGB"))).permute(2, 0, 1)[None, :, :128, :192].float() / 255
    with torch.no_grad():
        latent, latent_half = taef2.encode(image), half.encode(image)
        decoded, decoded_half = taef2.decode(latent), half.decode(latent)
        tiled = gather(half.decode_tiled(latent, 8))
        tiled_latent = half.encode_tiled(lambda y0, y1, x0, x1: image[..., y0:y1, x0:x1], tuple(latent.shape[-2:]), 8)
    assert latent_half.dtype == decoded_half.dtype == torch.float32
    assert (latent_half - latent).abs().mean() < 0.02 * latent.abs().mean()
    assert (decoded_half - decoded).abs().mean() < 1 / 255 and (decoded_half - decoded).abs().max() < 16 / 255
    assert (tiled - decoded_half).abs().mean() < 1 / 255
    assert (tiled_latent - latent_half).abs().mean() < 0.02 * latent.abs().mean()


def head_codec(tmp_path: Path, seed: int = 0) -> TAEF2Codec:
    """The bundled TAEF2 with a random LR head, written as a real safetensors file beside a copy of its weights."""
    for name in WEIGHT_FILES:
        (tmp_path / name).write_bytes((BUNDLED_WEIGHTS / name).read_bytes())
    torch.manual_seed(seed)
    save_file({k: v.half() for k, v in make_lr_head().state_dict().items()}, str(tmp_path / LR_HEAD_FILE))
    return TAEF2Codec(weights_dir=tmp_path)


@torch.no_grad()
def test_lr_head_is_optional_and_tiles_like_the_encoder(tmp_path):
    codec = head_codec(tmp_path)
    assert codec.lr_scale == 4
    lr = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    latent = codec.encode_lr(lr)
    assert latent.shape == (1, 32, 20, 18) and latent.dtype == torch.float32
    tiled = codec.encode_lr_tiled(lambda y0, y1, x0, x1: lr[..., y0:y1, x0:x1], (20, 18), 8)
    print(f"LR head tiled vs whole: mean {(tiled - latent).abs().mean():.2e}, max {(tiled - latent).abs().max():.2e}")
    assert (tiled - latent).abs().mean() < 0.01 * latent.abs().mean() and (tiled - latent).abs().max() < 0.2
    (tmp_path / LR_HEAD_FILE).unlink()
    plain = TAEF2Codec(weights_dir=tmp_path)
    assert plain.lr_scale is None
    with pytest.raises(ValueError, match="no LR head.*taef2_lr_head_x4.safetensors"):
        plain.encode_lr(lr)
    with pytest.raises(ValueError, match="multiple of the codec scale 2"):
        codec.encode_lr(torch.rand(1, 3, 41, 36))


def test_lr_head_file_is_loaded_strictly(tmp_path):
    head_codec(tmp_path)
    state = load_file(str(tmp_path / LR_HEAD_FILE))
    state["9.weight"] = state.pop("3.weight")
    save_file(state, str(tmp_path / LR_HEAD_FILE))
    with pytest.raises(ValueError, match=r"missing keys \['3.weight'\], unexpected keys \['9.weight'\]"):
        TAEF2Codec(weights_dir=tmp_path)


@needs_shared
@torch.no_grad()
def test_bundled_lr_head_gives_the_upscales_condition_on_real_photos():
    """The shipped LR head stands in for encoding the x4 bicubic upscale: on real LR photos it never saw
    (RealSR, every 10th), its latent stays within a few % of the upscale's variance (whole images, fp32). End to end it
    scores as well or better (BENCHMARKS.md, "The condition from the LR itself")."""
    from teasr_core.upscale.pipeline import resize_bicubic
    codec = TAEF2Codec()
    files = sorted((SHARED / "data" / "RealSR_crop128" / "lr").glob("*.png"))[::10]
    lr = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]).float() / 255
    exact = codec.encode(resize_bicubic(lr, (512, 512)))
    error = (codec.encode_lr(lr) - exact).square().mean() / exact.var()
    print(f"LR head vs encoded upscale on {len(files)} RealSR LR photos: relative MSE {error:.4f}")
    assert error < 0.08   # 0.050 measured (2026-12-03); 0.020 on its own held-out training pairs
