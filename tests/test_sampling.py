"""Schedules, samplers, position-keyed noise, tiling and the upscale pipeline on a tiny model."""
from __future__ import annotations

import pytest
import torch

from teasr_core.codecs.codec import PixelCodec
from teasr_core.network.model import DualBranchDiT, preset
from teasr_core.sampling import (ModelSampling, batch_noise, flow_map_step, noise_field, sample, shifted_sigmas,
                                 sigmas_from_timesteps)
from teasr_core.tiling import feather, plan_tiles
from teasr_core.upscale.pipeline import UpscaleSettings, Upscaler, count_model_calls, upscale


def tiny_upscaler(seed: int = 0, local: bool = False) -> Upscaler:
    """A random tiny pixel model (scale 4 codec: 48 channels). local=True zeroes attention outputs,
    making every token independent of the others, so tiling must reproduce untiled output exactly."""
    torch.manual_seed(seed)
    dit = DualBranchDiT(preset("tiny", lora_ranks=(2, 2))).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_" in name and name.endswith("_B"):
                p.normal_(0, 0.05)
        if local:
            for block in dit.transformer_blocks:
                for tensor in block.attn.to_out[0].parameters():
                    tensor.zero_()  # base weight, bias and both LoRA paths
    return Upscaler(dit, PixelCodec(scale=4))


def test_shifted_sigmas_are_data():
    s = shifted_sigmas(4, shift=3.0)
    assert s.shape == (5,) and s[0] == 1 and s[-1] == 0
    assert torch.all(s[:-1] > s[1:])
    torch.testing.assert_close(shifted_sigmas(4), torch.linspace(1, 0, 5))
    assert shifted_sigmas(2, start=0.5)[0] == pytest.approx(0.5)
    torch.testing.assert_close(sigmas_from_timesteps("999, 500,250"), torch.tensor([0.999, 0.5, 0.25, 0.0]))


def test_end_ratio_keeps_the_steps_at_high_noise():
    # 4 steps from 0.5 ending at 0.85 of it: the bundled model's grid, as explicit timesteps.
    torch.testing.assert_close(shifted_sigmas(4, start=0.5, end_ratio=0.85), sigmas_from_timesteps("500,475,450,425"))
    torch.testing.assert_close(shifted_sigmas(4, start=0.5, end_ratio=0.0), torch.linspace(0.5, 0, 5))
    assert torch.equal(shifted_sigmas(1, start=0.5, end_ratio=0.85), shifted_sigmas(1, start=0.5))  # one step: unchanged
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="end ratio"):
            UpscaleSettings(steps=2, end_ratio=bad)
    # None = the model's own ratio, given by the upscaler at sampling time.
    assert torch.equal(UpscaleSettings(steps=4).sigmas(ModelSampling(end_ratio=0.85)), UpscaleSettings(steps=4, end_ratio=0.85).sigmas())
    assert torch.equal(UpscaleSettings(steps=4, end_ratio=0.0).sigmas(ModelSampling(end_ratio=0.85)), UpscaleSettings(steps=4).sigmas())


def test_upscale_samples_on_the_models_own_grid():
    up, image = tiny_upscaler(), torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    own = upscale(Upscaler(up.dit, up.codec, sampling=ModelSampling(end_ratio=0.85)), image, UpscaleSettings(steps=3, color_fix="none"))
    explicit = upscale(up, image, UpscaleSettings(steps=3, end_ratio=0.85, color_fix="none"))
    uniform = upscale(up, image, UpscaleSettings(steps=3, color_fix="none"))
    assert torch.equal(own, explicit)  # the very same computation
    assert (own - uniform).abs().max() > 1e-3


@pytest.mark.parametrize("bad", ["500,750", "0", "1001", "a,b", ""])
def test_bad_timesteps_are_refused(bad):
    with pytest.raises(ValueError, match="timesteps"):
        sigmas_from_timesteps(bad)


@pytest.mark.parametrize("steps", [0, 51])
def test_step_count_is_bounded(steps):
    with pytest.raises(ValueError, match="steps"):
        UpscaleSettings(steps=steps)


def test_one_step_equals_the_flow_map_formula():
    up = tiny_upscaler()
    cond = torch.randn(1, 48, 8, 8)
    x = torch.randn_like(cond)
    denoise = lambda x_, s, t: up.dit(x_, cond, s, t)  # noqa: E731
    with torch.no_grad():
        out = sample(denoise, x, shifted_sigmas(1), "jump")
        explicit = x - 1.0 * up.dit(x, cond, torch.ones(1), torch.zeros(1))
        fm = flow_map_step(denoise, x, torch.tensor(1.0), torch.tensor(0.0))
    torch.testing.assert_close(out, explicit)
    torch.testing.assert_close(fm, explicit)


@pytest.mark.parametrize("mode", ["jump", "flowmap", "renoise"])
def test_samplers_are_deterministic_and_shape_preserving(mode):
    up = tiny_upscaler()
    cond = torch.randn(2, 48, 8, 8)
    denoise = lambda x_, s, t: up.dit(x_, cond, s, t)  # noqa: E731
    runs = []
    for _ in range(2):
        x = batch_noise(7, 0, cond)
        with torch.no_grad():
            runs.append(sample(denoise, x, shifted_sigmas(3), mode, noise=lambda i: batch_noise(7, 1 + i, cond)))
    assert runs[0].shape == cond.shape
    assert torch.equal(runs[0], runs[1])


def test_noise_is_a_function_of_position():
    whole = noise_field(3, 0, 4, 0, 0, 70, 50)
    part = noise_field(3, 0, 4, 20, 33, 40, 17)
    assert torch.equal(whole[:, 20:60, 33:50], part)
    assert not torch.equal(noise_field(4, 0, 4, 0, 0, 8, 8), whole[:, :8, :8])
    assert not torch.equal(noise_field(3, 1, 4, 0, 0, 8, 8), whole[:, :8, :8])
    assert abs(whole.mean()) < 0.05 and abs(whole.std() - 1) < 0.05


def test_tile_plan_covers_and_feathers_only_interior_edges():
    tiles = plan_tiles(40, 26, tile=16, overlap=4, multiple=2)
    cover = torch.zeros(40, 26)
    for t in tiles:
        assert t.y0 % 2 == 0 and t.x0 % 2 == 0 and t.h == 16 and t.w == 16
        cover[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w] += feather(t, 40, 26, 4)
    assert (cover > 0).all()
    corner = feather(tiles[0], 40, 26, 4)
    assert corner[0, 0] == 1 and corner[0, -1] < 1 and corner[-1, 0] < 1  # outer borders unfeathered


def test_tiled_equals_untiled_for_a_token_local_model():
    up = tiny_upscaler(local=True)
    image = torch.rand(1, 3, 24, 20)
    base = UpscaleSettings(steps=2, seed=5, color_fix="none")
    whole = upscale(up, image, base)
    tiled = upscale(up, image, UpscaleSettings(steps=2, seed=5, color_fix="none", tile=40, tile_overlap=16))
    assert count_model_calls(up, (24, 20), UpscaleSettings(steps=2, tile=40, tile_overlap=16)) > 2
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_tiled_close_to_untiled_for_a_full_model():
    up = tiny_upscaler()
    image = torch.rand(1, 3, 24, 24)
    whole = upscale(up, image, UpscaleSettings(seed=1, color_fix="none"))
    tiled = upscale(up, image, UpscaleSettings(seed=1, color_fix="none", tile=64, tile_overlap=32))
    diff = (tiled - whole).abs().mean().item()
    assert diff < 0.1 * whole.std().item(), diff


def test_upscale_shapes_seed_and_progress():
    up = tiny_upscaler()
    image = torch.rand(2, 3, 9, 13)  # not a multiple of anything: padded then cropped
    calls = []
    out = upscale(up, image, UpscaleSettings(steps=3, seed=0), progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (2, 3, 36, 52) and out.min() >= 0 and out.max() <= 1
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(out, upscale(up, image, UpscaleSettings(steps=3, seed=0)))
    assert not torch.equal(out, upscale(up, image, UpscaleSettings(steps=3, seed=1)))
    for i in range(2):  # an image's result does not depend on its batch position
        alone = upscale(up, image[i:i + 1], UpscaleSettings(steps=3, seed=0))
        torch.testing.assert_close(alone, out[i:i + 1], rtol=0, atol=1e-5)


def test_start_strength_starts_from_the_noised_lr():
    up = tiny_upscaler()
    image = torch.rand(1, 3, 8, 8)
    a = upscale(up, image, UpscaleSettings(steps=2, start_strength=0.3, color_fix="none"))
    b = upscale(up, image, UpscaleSettings(steps=2, start_strength=1.0, color_fix="none"))
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("image, message", [
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    (torch.rand(1, 4, 8, 8), "RGB"),
    (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "float"),
])
def test_bad_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        upscale(tiny_upscaler(), image)


def test_tiny_input_works():
    out = upscale(tiny_upscaler(), torch.rand(1, 3, 1, 1))
    assert out.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("settings, message", [
    (dict(mode="euler"), "unknown sampler mode"),
    (dict(mode="renoise", stochasticity=1.5), "stochasticity"),
    (dict(stochasticity=-0.1), "stochasticity"),
])
def test_bad_settings_are_refused_when_made(settings, message):
    """Every knob is checked where the settings are made, before a model runs (CLI flags, node inputs)."""
    with pytest.raises(ValueError, match=message):
        UpscaleSettings(**settings)
