"""The quality gate of the bundled default model: on real x4 pairs it must restore, not just run.

Six pairs spread over the two shared real-world halves (RealSR, DRealSR; every 16th file), the
README's main path (`pipeline.upscale` with the CLI's defaults), scored as `python -m teasr_core eval`
scores (8-bit output, LPIPS-Alex, DISTS, PSNR-Y). A model that turns photos into noise, or only
reproduces the bicubic upscale, fails here: LPIPS must be clearly below bicubic's at 1 step and below
it at 4 steps, and the 1-step result must keep bicubic's fidelity (DISTS below, PSNR-Y at most 2.5 dB lower).
The 4-step fidelity (PSNR-Y, DISTS) is reported by the model card, not guarded: the shipped model
(stage 2 after 248 distillation steps) does not reach it yet.
"""
from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from teasr_core.eval.baselines import bicubic_upscale
from teasr_core.eval.evaluate import pair_files, quantise_8bit
from teasr_core.eval.metrics import evaluate_pair, load_metrics
from teasr_core.imageio import read_image
from teasr_core.pipeline import Upscaler, UpscaleSettings, upscale

# How far below bicubic's LPIPS the model must be on these six pairs. 1 step, the default: "clearly"
# (0.08-0.10 below on the every-4th subsets of the model card). 4 steps: below (0.06-0.07 below on
# those subsets since stage 2; the CPU stage-1 file was only 0.025 below on these six).
LPIPS_MARGIN = {"1 step": 0.03, "4 steps": 0.0}
PSNR_DROP = 2.5       # dB below bicubic at most


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


def test_bundled_model_keeps_bicubic_fidelity_at_one_step(scores):
    bicubic, model = scores["bicubic"], scores["1 step"]
    assert model["dists"] < bicubic["dists"], (model, bicubic)
    assert model["psnr"] >= bicubic["psnr"] - PSNR_DROP, (model, bicubic)


def test_same_seed_same_image():
    lr = read_image(shared_path("data", "RealSR_crop128", "lr", "Canon_004_LR4.png")).rgb[..., :64, :64]
    upscaler = Upscaler.from_checkpoint()
    first, second = (upscale(upscaler, lr, UpscaleSettings(steps=2, seed=7)) for _ in range(2))
    assert torch.equal(first, second)  # the very same computation twice
