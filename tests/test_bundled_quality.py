"""The quality gate of the bundled default model: on real x4 pairs it must restore, not just run.

Six pairs spread over the two shared real-world halves (RealSR, DRealSR; every 16th file), the
README's main path (`pipeline.upscale` with the CLI's defaults), scored as `python -m teasr_core eval`
scores (8-bit output, LPIPS-Alex, DISTS, PSNR-Y). A model that turns photos into noise, or only
reproduces the bicubic upscale, fails here: LPIPS must be clearly below bicubic's at 1 and 4 steps, with
PSNR-Y at most 2 dB lower; 4 steps (on the model's own grid, end ratio 0.85) within 0.01 LPIPS of 1
step; and DISTS below bicubic's at both. The defaults come from the file (its attention window) and the
codec (the LR head), so a change to either is held to this too.
"""
from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from teasr_core.eval.baselines import bicubic_upscale
from teasr_core.eval.evaluate import pair_files, quantise_8bit
from teasr_core.eval.metrics import evaluate_pair, load_metrics
from teasr_core.upscale.imageio import read_image
from teasr_core.upscale.pipeline import Upscaler, UpscaleSettings, upscale

# How far below bicubic's LPIPS the model must be on these six pairs: "clearly". Measured 2026-12-03 (auto
# precision on an AVX-512 BF16 CPU) with the file's own decoder (BENCHMARKS.md, "A decoder fine-tuned on the
# model's own samples"): 1 step LPIPS 0.228, bicubic 0.388; PSNR-Y 26.55 / 28.10 dB; DISTS 0.239 / 0.248
# (the file before it: 0.280 LPIPS, 27.38 dB, 0.238 DISTS).
LPIPS_MARGIN = {"1 step": 0.12, "4 steps": 0.12}
# dB below bicubic at most: that decoder trades ~0.8 dB of PSNR-Y for ~0.03 LPIPS on the shared halves;
# issue 19 allows 3 dB at 4 steps.
PSNR_DROP = 2.0
STEPS_LPIPS_SLACK = 0.01  # 4 steps may trail 1 step by this much LPIPS (issue 9's bar)


@pytest.fixture(scope="module")
def scores():
    pairs = []
    for name in ("RealSR_crop128", "DRealSR_crop128"):
        lr_dir, hr_dir = shared_path("data", name, "lr"), shared_path("data", name, "hr")
        pairs += pair_files(lr_dir, hr_dir)[::16]
    upscaler = Upscaler.from_checkpoint()
    metrics = load_metrics()
    methods = {"bicubic": lambda lr: bicubic_upscale(lr, 4),
               "1 step": lambda lr: upscale(upscaler, lr, UpscaleSettings(steps=1)),
               "4 steps": lambda lr: upscale(upscaler, lr, UpscaleSettings(steps=4))}
    totals = {m: {"psnr": 0.0, "lpips": 0.0, "dists": 0.0} for m in methods}
    for _, lr_path, hr_path in pairs:
        lr, hr = read_image(lr_path).rgb, read_image(hr_path).rgb
        for method, run in methods.items():
            row = evaluate_pair(quantise_8bit(run(lr)), hr, *metrics)
            for key in totals[method]:
                totals[method][key] += float(row[key]) / len(pairs)
    return totals


@pytest.mark.parametrize("steps", ["1 step", "4 steps"])
def test_bundled_model_is_clearly_more_perceptual_than_bicubic(scores, steps):
    bicubic, model = scores["bicubic"], scores[steps]
    assert model["lpips"] <= bicubic["lpips"] - LPIPS_MARGIN[steps], (steps, model, bicubic)


@pytest.mark.parametrize("steps", ["1 step", "4 steps"])
def test_bundled_model_keeps_bicubic_fidelity(scores, steps):
    bicubic, model = scores["bicubic"], scores[steps]
    assert model["psnr"] >= bicubic["psnr"] - PSNR_DROP, (steps, model, bicubic)
    assert model["dists"] < bicubic["dists"], (steps, model, bicubic)


def test_more_steps_do_not_lose_to_one_step(scores):
    assert scores["4 steps"]["lpips"] <= scores["1 step"]["lpips"] + STEPS_LPIPS_SLACK, scores


def test_same_seed_same_image():
    lr = read_image(shared_path("data", "RealSR_crop128", "lr", "Canon_004_LR4.png")).rgb[..., :64, :64]
    upscaler = Upscaler.from_checkpoint()
    first, second = (upscale(upscaler, lr, UpscaleSettings(steps=2, seed=7)) for _ in range(2))
    assert torch.equal(first, second)  # the very same computation twice
