"""The TEASR step's faster schedule and LoRA paths give today's losses and gradients to round-off.

Reference: the step as it was (terms one after the other, no-grad passes one by one, one total backward,
LoRA down-projections as separate matmuls, every present LoRA computed). New: independent no-grad passes
stacked on the batch dimension, each loss group back-propagated right after its forward, the decoder
feeding LPIPS checkpointed, the down-projections fused into the dequantised fp8 base's matmul, and
zero-scaled LoRAs skipped. Same model, inputs and seeds; tiny preset, fp32 on the CPU, real LPIPS.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from teasr_core.codecs.codec import PixelCodec
from teasr_core.network.lora import DualLoRALinear, dual_lora_layers
from teasr_core.network.model import DualBranchDiT, preset
from train.config import TrainConfig
from train.distill import set_trainable
from train.objectives import PassCounter
from train.objectives.teasr import TeasrObjective

from conftest import fp8_dual_lora_layer

OLD = dict(stack_passes=False, backward_per_group=False, checkpoint_decoder=False)
NEW = dict(stack_passes=True, backward_per_group=True, checkpoint_decoder=True)


@pytest.fixture(scope="module")
def lpips():
    from teasr_core.eval.metrics import LPIPS
    return LPIPS()


def lora_model(fp8: bool = False, fuse: bool = True, alphas=None) -> DualBranchDiT:
    torch.manual_seed(0)
    dit = DualBranchDiT(preset("tiny", lora_ranks=(4, 4), lora_alphas=alphas))
    set_trainable(dit, full=False)
    with torch.no_grad():       # non-zero LoRA B, so both factors get gradients
        for name, p in dit.named_parameters():
            if name.endswith("_B"):
                p.normal_(0, 0.05)
    if fp8:
        dit.quantize_base_fp8()
    for _, layer in dual_lora_layers(dit):
        layer.fuse_down = fuse
    return dit


def step(dit, lpips, cfg, batch: int = 2):
    """One micro-batch of the objective: (logged terms, gradients by name, pass counts)."""
    codec = PixelCodec(4)
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(batch, 3, 64, 64, generator=g)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    x0 = codec.encode(hr)
    cond = codec.encode(torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic"))
    dit.zero_grad(set_to_none=True)
    counts = Counter()
    objective = TeasrObjective(cfg, codec, lpips)
    loss, terms = objective(PassCounter(dit, counts), x0, cond, hr, torch.Generator().manual_seed(7),
                            lambda part: (part / 2).backward())
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    return {"loss": loss, **terms}, grads, counts


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    (terms_a, grads_a, _), (terms_b, grads_b, _) = a, b
    assert terms_a.keys() == terms_b.keys()
    for k in terms_a:
        torch.testing.assert_close(terms_b[k], terms_a[k], rtol=rtol, atol=atol, msg=k)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:
        scale = grads_a[k].abs().max().item()
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=rtol, atol=atol + rtol * scale, msg=k)


@pytest.mark.parametrize("options", [dict(stack_passes=True), dict(backward_per_group=True),
                                     dict(backward_per_group=True, checkpoint_decoder=True), NEW])
@pytest.mark.parametrize("weights", [{}, dict(w_adv=0.0), dict(split_batch=True, batch=4), dict(w_jump=0.5, w_e2e=0.0),
                                     dict(pixel_window=8, pixel_margin=2, w_l1=0.5),
                                     dict(own_path_share=0.5, own_path_steps=(2, 4), own_path_regression=0.5)])
def test_new_schedule_gives_the_same_losses_and_gradients(lpips, options, weights):
    batch = 4 if weights.get("split_batch") else 2
    base = replace(TrainConfig(), **weights, **OLD)
    before = step(lora_model(), lpips, base, batch)
    after = step(lora_model(), lpips, replace(base, **options), batch)
    assert_same(before, after)
    assert {"pix_lpips", "pix_mse", "rect"} <= before[0].keys()
    counts_before, counts_after = before[2], after[2]
    assert counts_after["fwd_grad"] == counts_before["fwd_grad"]
    assert counts_after["fwd_nograd"] == counts_before["fwd_nograd"]
    if options.get("stack_passes") and not base.own_path_share:   # every no-grad pass lands in one of rcgm_substeps calls
                                                                  # (own-path starts walk the sampler first)
        nograd_calls = counts_after["calls_fwd"] - counts_after["fwd_grad"]
        assert nograd_calls == base.rcgm_substeps < counts_before["fwd_nograd"]


def test_default_step_is_the_new_schedule(lpips):
    cfg = TrainConfig()
    assert (cfg.stack_passes, cfg.backward_per_group, cfg.checkpoint_decoder, cfg.fuse_lora_down) == (True,) * 4
    terms, _, counts = step(lora_model(), lpips, cfg)
    assert (counts["fwd_grad"], counts["fwd_nograd"], counts["calls_fwd"]) == (4, 5, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_down_projection_equals_separate_matmuls(dtype):
    """fp8 base: [W; A_noise; A_cond] in one matmul vs W x, then A x per branch: outputs, input and LoRA
    gradients equal to round-off; the base weight never gets a gradient."""
    layer = fp8_dual_lora_layer(3, (4, 8))
    x = torch.randn(2, 10, 64, dtype=dtype)
    results = []
    for fuse in (False, True):
        layer.fuse_down = fuse
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = layer(xi, 6)
        y.float().square().sum().backward()
        results.append((y.detach().float(), xi.grad.float(),
                        {n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None}))
    (y0, gx0, g0), (y1, gx1, g1) = results
    rtol = 1e-5 if dtype == torch.float32 else 2e-2    # relative to each tensor's largest value
    assert g0.keys() == g1.keys() == {"lora_noise_A", "lora_noise_B", "lora_cond_A", "lora_cond_B"}
    for name, got, want in [("y", y1, y0), ("x.grad", gx1, gx0)] + [(k, g1[k], g0[k]) for k in g0]:
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=name)


def test_fused_model_step_equals_the_unfused_one(lpips):
    cfg = replace(TrainConfig(), **NEW)
    assert_same(step(lora_model(fp8=True, fuse=False), lpips, cfg), step(lora_model(fp8=True, fuse=True), lpips, cfg))


def test_a_zero_scaled_lora_costs_nothing_and_changes_nothing():
    """ODTSR's recipe (noise branch alpha 0): no matmul for that LoRA, its factors get no gradient, and the
    output is the base plus the other branch's LoRA, as computing the zero-scaled term gave."""
    torch.manual_seed(4)
    layer = DualLoRALinear(16, 12, ranks=(4, 4), alphas=(0.0, 4.0))
    with torch.no_grad():
        layer.lora_noise_B.normal_()
        layer.lora_cond_B.normal_()
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = layer(x, 3)
    want = x @ layer.weight.T + layer.bias
    want = torch.cat([want[:, :3], want[:, 3:] + x[:, 3:] @ layer.lora_cond_A.T @ layer.lora_cond_B.T], 1)
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    assert layer.lora_noise_A.grad is None and layer.lora_noise_B.grad is None
    assert layer.lora_cond_A.grad is not None and layer.active_branches(3, 7) == [(1, 3, 7)]


def test_rmsprop_keeps_one_state_per_trained_tensor():
    """The memory option for the 20 B model: RMSprop's square average only, where AdamW keeps two moments."""
    from train.distill import make_optimizer
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    states = {}
    for name in ("adamw", "rmsprop"):
        optimizer = make_optimizer(replace(TrainConfig(), optimizer=name), params, torch.device("cpu"))
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states[name] = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.numel() > 1)
    assert states == {"adamw": 2 * 17, "rmsprop": 17}
    with pytest.raises(ValueError, match="optimizer must be one of"):
        replace(TrainConfig(), optimizer="sgd")
