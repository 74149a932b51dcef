"""The dual-branch DiT against ComfyUI's own Qwen-Image transformer, and its branch routing."""
from __future__ import annotations

import torch

from teasr_core.network import lora as lora_module
from teasr_core.network.lora import DualLoRALinear
from teasr_core.network.model import DualBranchDiT, preset

from conftest import assert_close_rel, fp8_dual_lora_layer

CFG = preset("tiny", in_channels=16, context_dim=48)
RAW_ROPE = 1e-4   # ComfyUI computes RoPE angles in float32, we in float64


def comfy_qwen(comfy, cfg, shared_positions: bool = False):
    """ComfyUI's QwenImageTransformer2DModel with our config; optionally reference latents at our positions."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    class SharedPositions(QwenImageTransformer2DModel):
        def process_img(self, x, index=0, h_offset=0, w_offset=0):
            return super().process_img(x)  # every image at frame 0, no offset: what TEASR does

    cls = SharedPositions if shared_positions else QwenImageTransformer2DModel
    return cls(patch_size=cfg.patch, in_channels=cfg.in_channels * 4, out_channels=cfg.in_channels,
               num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
               joint_attention_dim=cfg.context_dim, axes_dims_rope=cfg.rope_axes,
               operations=comfy.ops.disable_weight_init).eval()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (LoRA B included when present), deterministic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def base_state_dict(ours: DualBranchDiT) -> dict:
    """Our weights under Qwen-Image names (drop TEASR-only tensors)."""
    return {k: v for k, v in ours.state_dict().items()
            if "lora_" not in k and not k.startswith("time_text_embed_2") and k != "null_context"}


def test_single_branch_equals_comfyui_qwen_image(comfy):
    torch.manual_seed(0)
    ours = DualBranchDiT(CFG).eval()
    randomize(ours)
    ref = comfy_qwen(comfy, CFG)
    missing, unexpected = ref.load_state_dict(base_state_dict(ours), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    x, ctx, sigma = torch.randn(2, 16, 8, 12), torch.randn(2, 5, 48), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        want = ref(x[:, :, None], sigma, ctx)[:, :, 0]   # ComfyUI takes [B, C, T, h, w]
        got = ours(x, None, sigma, sigma, ctx)
    assert_close_rel(got, want, RAW_ROPE)


def test_fresh_dual_branch_equals_its_single_branch_base(comfy):
    """Zero LoRA B + target time = current time: exactly the base model on [noise | LR] tokens."""
    cfg = preset("tiny", in_channels=16, context_dim=48, lora_ranks=(4, 4))
    ours = DualBranchDiT(cfg).eval()
    randomize(ours)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name and name.endswith("_B"):
                p.zero_()
        ours.time_text_embed_2.load_state_dict(ours.time_text_embed.state_dict())
    ref = comfy_qwen(comfy, cfg, shared_positions=True)
    ref.load_state_dict(base_state_dict(ours), strict=True)
    x, cond, ctx = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 3, 48)
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        want = ref(x[:, :, None], sigma, ctx, ref_latents=[cond[:, :, None]], ref_latents_method="offset")[:, :, 0]
        got = ours(x, cond, sigma, sigma, ctx)
    assert_close_rel(got, want, RAW_ROPE)


def test_branch_routing_is_by_explicit_token_range():
    """Changing one branch's LoRA only changes that branch's tokens, with uneven token counts."""
    layer = DualLoRALinear(8, 6, ranks=(2, 3))
    with torch.no_grad():
        layer.lora_noise_B.normal_()
        layer.lora_cond_B.normal_()
    x = torch.randn(2, 7, 8)
    split = 3
    before = layer(x, split).detach()
    with torch.no_grad():
        layer.lora_cond_B.add_(1.0)
    after = layer(x, split).detach()
    assert torch.equal(before[:, :split], after[:, :split])
    assert not torch.allclose(before[:, split:], after[:, split:])
    with torch.no_grad():
        layer.lora_noise_B.add_(1.0)
    again = layer(x, split).detach()
    assert torch.equal(after[:, split:], again[:, split:])
    assert not torch.allclose(after[:, :split], again[:, :split])


def test_condition_tokens_do_not_touch_noise_lora_gradients():
    """Gradients reach each branch's LoRA only from its own tokens."""
    layer = DualLoRALinear(8, 6, ranks=(2, 2))
    x = torch.randn(1, 5, 8)
    layer(x, 2)[:, 2:].sum().backward()           # loss on cond tokens only
    assert layer.lora_noise_B.grad is None or torch.count_nonzero(layer.lora_noise_B.grad) == 0
    assert torch.count_nonzero(layer.lora_cond_B.grad) > 0


def test_modulation_gives_each_branch_its_own_parameters():
    cfg = preset("tiny", lora_ranks=(2, 2))
    model = DualBranchDiT(cfg).eval()
    randomize(model)
    x, cond = torch.randn(1, 48, 4, 4), torch.randn(1, 48, 4, 4)
    with torch.no_grad():
        a = model(x, cond, torch.tensor([0.5]), torch.tensor([0.0]))
        b = model(x, cond, torch.tensor([0.5]), torch.tensor([-0.3]))   # only the LR branch's time changes
        c = model(x, cond, torch.tensor([0.5]), torch.tensor([0.0]))
    assert torch.equal(a, c)
    assert not torch.allclose(a, b), "the signed target time must reach the output through the LR branch"


def test_merge_lora_preserves_both_branches():
    torch.manual_seed(1)
    layer = DualLoRALinear(16, 12, ranks=(4, 2))
    with torch.no_grad():
        layer.lora_noise_B.normal_()
        layer.lora_cond_B.normal_()
    x = torch.randn(2, 9, 16)
    before = layer(x, 4).detach()
    layer.merge_lora("noise")
    assert layer.lora_noise_A is None and layer.ranks == (0, 6)
    torch.testing.assert_close(layer(x, 4), before, rtol=1e-5, atol=1e-5)


def test_fp8_base_within_bf16_tolerance():
    torch.manual_seed(2)
    model = DualBranchDiT(preset("tiny", lora_ranks=(2, 2))).eval()
    x, cond = torch.randn(1, 48, 8, 8), torch.randn(1, 48, 8, 8)
    args = (x, cond, torch.tensor([0.8]), torch.tensor([0.0]))
    with torch.no_grad():
        ref = model(*args)
        bf16 = model.to(torch.bfloat16)(*args).float()
        model.quantize_base_fp8()
        fp8 = model(*args).float()
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    bf16_err = (bf16 - ref).abs().mean() / ref.abs().mean()
    fp8_err = (fp8 - ref).abs().mean() / ref.abs().mean()
    assert fp8_err < 0.05, fp8_err
    assert fp8_err < 4 * bf16_err + 0.01, (fp8_err, bf16_err)


def test_fp8_base_runs_real_fp8_matmuls_where_the_device_has_them(monkeypatch, caplog):
    """Opted in, CUDA 8.9+ takes torch._scaled_mm (row-wise scales); this CPU runs the same kernel call when told to."""
    layer = fp8_dual_lora_layer(5, (4, 4))
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    dequantised = x.clone().requires_grad_()
    want = layer(dequantised, 6)
    want.float().square().sum().backward()

    monkeypatch.setattr(lora_module, "fp8_matmul_available", lambda x: True)
    assert not layer.fp8_matmul     # an opt-in: dequantised bf16 products were faster on the H200
    layer.fp8_matmul = True
    fp8 = x.clone().requires_grad_()
    got = layer(fp8, 6)
    got.float().square().sum().backward()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(got, want) < 0.05                      # activations quantised to e4m3 per token
    assert rel(fp8.grad, dequantised.grad) < 0.05     # backward through the dequantised weight

    def refuse(*args, **kwargs):
        raise RuntimeError("Expected trailing dimension of mat1 to be divisible by 16")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with caplog.at_level("WARNING", logger="teasr"), torch.no_grad():
        assert torch.equal(layer(x, 6), want.detach())
    assert not layer.fp8_matmul and "no fp8 matmul" in caplog.text


def test_dtype_cast_keeps_an_fp8_base_and_its_scales():
    torch.manual_seed(3)
    model = DualBranchDiT(preset("tiny")).eval()
    model.quantize_base_fp8()
    x, cond = torch.randn(1, 48, 4, 4), torch.randn(1, 48, 4, 4)
    with torch.no_grad():
        before = model(x, cond, torch.tensor([0.5]), torch.tensor([0.0]))
        model.to(torch.float64).to(torch.float32)
        after = model(x, cond, torch.tensor([0.5]), torch.tensor([0.0]))
    q = model.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    torch.testing.assert_close(after, before)


def test_sample_prediction_returns_the_velocity_to_its_clean_sample():
    """prediction="sample": the last layer emits D and the model returns F = (x - D) / sigma."""
    torch.manual_seed(4)
    cfg = preset("tiny", prediction="sample")
    model = DualBranchDiT(cfg).eval()
    velocity_model = DualBranchDiT(preset("tiny")).eval()
    velocity_model.load_state_dict(model.state_dict())
    x, cond = torch.randn(2, 48, 4, 4), torch.randn(2, 48, 4, 4)
    sigma, target = torch.tensor([0.8, 0.01]), torch.tensor([0.0, 0.0])
    with torch.no_grad():
        d = velocity_model(x, cond, sigma, target)        # the same network read as a raw output
        f = model(x, cond, sigma, target)
    torch.testing.assert_close(x - sigma.clamp_min(0.05).view(-1, 1, 1, 1) * f, d, rtol=1e-5, atol=1e-5)


def test_fresh_residual_model_jumps_to_its_condition():
    """prediction="residual" with the zero-initialised output layer: one jump lands on the LR latent."""
    model = DualBranchDiT(preset("tiny", prediction="residual")).eval()
    x, cond = torch.randn(1, 48, 4, 4), torch.randn(1, 48, 4, 4)
    with torch.no_grad():
        f = model(x, cond, torch.tensor([1.0]), torch.tensor([0.0]))
    torch.testing.assert_close(x - f, cond)
