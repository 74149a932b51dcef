"""The whole upscale path in tiles and row bands: tiled == untiled within stated tolerances, for each
codec the pack ships (pixel, TAEF2), and peak memory that grows with the output, not 19x it.

Tolerances (measured on these inputs, asserted with headroom):
- pixel codec, token-local model: every stage tiled/banded vs whole image, max |diff| < 1e-5
  (the reference, sampler, decode and wavelet fix are exact; only float summation order differs);
  adain's two-pass version likewise.
- TAEF2 codec (whole-image GroupNorm statistics, 8 latent px of margin): latent from tiled encode
  mean |diff| ~3e-4 (latent std ~0.9); decoded image mean ~0.03/255, max ~4/255 at a few pixels;
  the whole pipeline with a token-local TAEF2-latent model in 64-px tiles: mean < 0.5/255.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from teasr_core.codecs.codec import PixelCodec
from teasr_core.network.model import DualBranchDiT, preset
from teasr_core.sampling import ModelSampling
from teasr_core.tiling import gather
from teasr_core.upscale import pipeline
from teasr_core.upscale.color import color_fix
from teasr_core.upscale.pipeline import (Reference, UpscaleSettings, Upscaler, count_model_calls, resize_bicubic,
                                         upscale)

from conftest import REPO, shared_path


def local_dit(in_channels: int, seed: int = 0) -> DualBranchDiT:
    """A random tiny DiT whose attention outputs are zeroed: every token is independent of the others,
    so DiT tiling is exact and any tiled-vs-untiled difference comes from the other stages."""
    torch.manual_seed(seed)
    dit = DualBranchDiT(preset("tiny", in_channels=in_channels, lora_ranks=(2, 2))).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_" in name and name.endswith("_B"):
                p.normal_(0, 0.05)
        for block in dit.transformer_blocks:
            for tensor in block.attn.to_out[0].parameters():
                tensor.zero_()
    return dit


def photo(size: tuple[int, int]) -> torch.Tensor:
    path = shared_path("data", "RealSR_crop128", "lr", "Canon_004_LR4.png")
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    return image[..., :size[0], :size[1]]


def test_reference_windows_equal_the_whole_padded_upscale():
    image = torch.rand(2, 3, 13, 11, generator=torch.Generator().manual_seed(0))
    whole = resize_bicubic(image, (52, 44))
    padded = torch.nn.functional.pad(whole, (0, 4, 0, 12), mode="reflect")
    reference = Reference(image, 4, (64, 48))
    for y0, y1, x0, x1 in [(0, 64, 0, 48), (5, 9, 3, 30), (40, 64, 30, 48), (50, 51, 0, 1)]:
        torch.testing.assert_close(reference.window(y0, y1, x0, x1), padded[..., y0:y1, x0:x1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings", [
    UpscaleSettings(steps=2, seed=3, color_fix="wavelet"),
    UpscaleSettings(steps=3, seed=3, color_fix="adain", mode="renoise"),
    UpscaleSettings(steps=2, seed=3, color_fix="wavelet", mode="flowmap", start_strength=0.6),
], ids=["wavelet-jump", "adain-renoise", "wavelet-flowmap-start0.6"])
def test_pixel_codec_tiled_equals_untiled(settings, monkeypatch):
    up = Upscaler(local_dit(48), PixelCodec(4))
    image = torch.rand(1, 3, 37, 45, generator=torch.Generator().manual_seed(1))   # output 148 x 180, padded
    whole = upscale(up, image, settings)
    monkeypatch.setattr(pipeline, "ROW_BAND_PIXELS", 180 * 40)   # colour fix in 5 bands (adain: in 4)
    tiled = upscale(up, image, UpscaleSettings(**{**settings.__dict__, "tile": 48, "tile_overlap": 16}))
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    if settings.color_fix == "wavelet":   # and the banded fix equals the whole-image one
        plain = upscale(up, image, UpscaleSettings(**{**settings.__dict__, "color_fix": "none"}))
        reference = resize_bicubic(image, whole.shape[-2:])
        torch.testing.assert_close(color_fix(plain, reference, "wavelet"), whole, rtol=0, atol=1e-5)


def test_attention_tile_windows_the_transformer_only():
    """The model's attention tile (its checkpoint's sampling metadata) runs the transformer in windows
    as a tile of that size would, while the rest of the image stays whole; a smaller image tile wins,
    0 turns it off, and the settings override the model's."""
    torch.manual_seed(0)
    dit = DualBranchDiT(preset("tiny", in_channels=48, lora_ranks=(2, 2))).eval()   # attention on: windows matter
    image = torch.rand(1, 3, 37, 45, generator=torch.Generator().manual_seed(1))   # output 148 x 180
    plain, windowed = Upscaler(dit, PixelCodec(4)), Upscaler(dit, PixelCodec(4), sampling=ModelSampling(
        attention_tile=64, attention_overlap=16))
    settings = UpscaleSettings(steps=2, seed=3)
    whole, own = upscale(plain, image, settings), upscale(windowed, image, settings)
    as_tiles = upscale(plain, image, replace(settings, tile=64, tile_overlap=16))
    torch.testing.assert_close(own, as_tiles, rtol=0, atol=1e-5)
    assert (own - whole).abs().mean() > 1e-4      # windows change what the transformer sees (9e-4 here)
    torch.testing.assert_close(upscale(plain, image, replace(settings, attention_tile=64, attention_overlap=16)), own,
                               rtol=0, atol=0)
    assert torch.equal(upscale(windowed, image, replace(settings, attention_tile=0)), whole)
    smaller = replace(settings, tile=48, tile_overlap=16)
    torch.testing.assert_close(upscale(windowed, image, smaller), upscale(plain, image, smaller), rtol=0, atol=0)
    assert count_model_calls(windowed, (37, 45), settings) == 2 * len(pipeline.plan_for(plain, (37, 45), replace(
        settings, tile=64, tile_overlap=16))[0]) == 2 * 12
    with pytest.raises(ValueError, match="attention_overlap 64 must be smaller than attention_tile 64"):
        UpscaleSettings(attention_tile=64, attention_overlap=64)


@pytest.fixture(scope="module")
def taef2():
    from teasr_core.codecs.taef2 import TAEF2Codec
    return TAEF2Codec()   # the bundled weights


@torch.no_grad()
def test_taef2_tiled_encode_and_decode_match_untiled(taef2):
    image = photo((128, 120))
    latent = taef2.encode(image)
    tiled_latent = taef2.encode_tiled(lambda y0, y1, x0, x1: image[..., y0:y1, x0:x1], latent.shape[-2:], 4)
    assert (tiled_latent - latent).abs().mean() < 2e-3 and (tiled_latent - latent).abs().max() < 0.2
    decoded, tiled = taef2.decode(latent), gather(taef2.decode_tiled(latent, 4))
    diff = (tiled - decoded).abs() * 255
    print(f"TAEF2 tiled vs untiled: latent mean {(tiled_latent - latent).abs().mean():.2e}; "
          f"image mean {diff.mean():.3f}/255, max {diff.max():.2f}/255")
    assert diff.mean() < 0.2 and diff.max() < 8


@torch.no_grad()
def test_taef2_model_tiled_upscale_matches_untiled(taef2):
    up = Upscaler(local_dit(32), taef2)
    image = photo((40, 36))          # output 160 x 144, latent 20 x 18: 3 x 3 DiT tiles, 3 x 3 codec tiles
    settings = UpscaleSettings(steps=1, seed=2)
    whole = upscale(up, image, settings)
    tiled = upscale(up, image, UpscaleSettings(steps=1, seed=2, tile=64, tile_overlap=32))
    diff = (tiled - whole).abs() * 255
    print(f"TAEF2 pipeline tiled vs untiled: mean {diff.mean():.3f}/255, max {diff.max():.2f}/255")
    assert diff.mean() < 0.5 and diff.max() < 16


CHILD = """
import json, resource, sys
from teasr_core.upscale import pipeline
from teasr_core.__main__ import main
pipeline.ROW_BAND_PIXELS = 2 ** 16    # bands far below these images, so what grows is only the output
code = main(["upscale", sys.argv[1], sys.argv[2], "--checkpoint", sys.argv[3], "--tile-size", "256",
             "--tile-overlap", "32"])
print(json.dumps({"code": code, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_peak_memory_grows_with_the_output_not_19x(tmp_path, tiny_ckpt):
    """CLI upscale of 64 x 192 and 256 x 192 inputs (tiny pixel model, 256-px tiles), peak RSS of a fresh process each.

    Same width, 4x the pixels: the bands every stage holds grow with the width only, so what grows is
    the 8-bit output (3 bytes per pixel). The old path held ~19 float32 copies of the output (~227
    bytes per output pixel): +134 MB here. Square images measured on this machine (384^2 -> 768^2
    output, bands growing with the width too): +49 bytes per extra output pixel.
    """
    peaks = {}
    for rows in (64, 256):
        src = tmp_path / f"in{rows}.png"
        Image.fromarray(np.random.default_rng(rows).integers(0, 255, (rows, 192, 3), dtype=np.uint8)).save(src)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / f"out{rows}.png"), str(tiny_ckpt)],
                              cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, proc.stderr
        peaks[rows] = result["peak"]
    growth = peaks[256] - peaks[64]
    extra_output_pixels = (1024 - 256) * 768
    print(f"peak RSS {peaks[64] / 2**20:.0f} MB -> {peaks[256] / 2**20:.0f} MB: "
          f"{growth / extra_output_pixels:.1f} bytes per extra output pixel")
    assert growth < 32 * extra_output_pixels     # ~10x the 8-bit output, 1/7 of the old path


@torch.no_grad()
def test_condition_from_the_lr_head_where_the_codec_has_one(tmp_path):
    from test_codecs import head_codec
    codec = head_codec(tmp_path)
    up, image = Upscaler(local_dit(32), codec), photo((24, 20))     # output 96 x 80: padded to 96 x 80
    settings = UpscaleSettings(steps=1, seed=2, color_fix="none", start_strength=0.1)
    auto, lr, upscaled = (upscale(up, image, replace(settings, condition=c)) for c in ("auto", "lr", "upscaled"))
    assert torch.equal(auto, lr) and (auto - upscaled).abs().mean() > 0.01   # a random head: a different condition
    assert pipeline.encodes_lr(codec, settings) and not pipeline.encodes_lr(codec, replace(settings, scale=2))
    with pytest.raises(ValueError, match="condition 'lr' needs a codec with an LR head for x2; taef2 has one for x4"):
        upscale(up, image, replace(settings, scale=2, condition="lr"))
    with pytest.raises(ValueError, match="condition 'lr' needs a codec with an LR head for x4; pixel has none"):
        upscale(Upscaler(local_dit(48), PixelCodec(4)), image, replace(settings, condition="lr"))
    with pytest.raises(ValueError, match="unknown condition 'hr'"):
        UpscaleSettings(condition="hr")
