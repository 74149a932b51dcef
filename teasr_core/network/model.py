"""The dual-branch MMDiT: Qwen-Image's double-stream transformer with a TEASR condition branch.

Image stream: `[noise tokens | LR-condition tokens]`, both from the same latent grid and sharing
the same 2-D RoPE positions, so every condition token is pixel-aligned with its noise token.
Context stream: text features (or a learned null context when the model has no text encoder).

Decoupled timestep: the noise branch, the context stream and the output layer are modulated by
emb(sigma) (the current noise level); the condition branch by emb_2(sigma_target), a second
embedder initialised as a copy of the first and fed the *signed* target time. The network output
is the average velocity from sigma to sigma_target (a flow map), so
x(sigma_target) = x(sigma) - (sigma - sigma_target) * F.

Module and parameter names follow Qwen-Image (ComfyUI / diffusers), so a Qwen-Image base
transformer loads by name; ours adds `time_text_embed_2`, the LoRA tensors and `null_context`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .embed import TimestepEmbedder, apply_rope, image_positions, rope_angles, text_positions
from .lora import DualLoRALinear


@dataclass(frozen=True)
class DiTConfig:
    depth: int
    heads: int
    head_dim: int
    in_channels: int                     # latent channels C (patchified to C * patch**2)
    patch: int = 2
    mlp_ratio: float = 4.0
    context_dim: int | None = None       # None: no text encoder, a learned null context is used
    null_context_tokens: int = 4
    rope_axes: tuple[int, int, int] = (16, 56, 56)
    lora_ranks: tuple[int, int] = (0, 0)  # (noise branch, condition branch)
    lora_alphas: tuple[float, float] | None = None
    eps: float = 1e-6
    # What the last layer emits. "velocity": F itself (Qwen-Image). "sample": the clean sample D, with
    # F = (x - D) / sigma. Pixel tokens (16 x 16 x 3 = 768 values) are wider than a small model, which
    # cannot carry the input noise through to a velocity; predicting D lets the skip x carry it
    # ("Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025). "residual": D is the
    # LR condition plus the output, whose layer starts at zero, so a fresh model's one-step result is
    # the bicubic upscale and training learns only the missing detail.
    prediction: str = "velocity"

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        d = dict(d)
        for key in ("rope_axes", "lora_ranks", "lora_alphas"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


PRESETS: dict[str, DiTConfig] = {
    # unit tests: < 2 M parameters
    "tiny": DiTConfig(depth=2, heads=2, head_dim=32, in_channels=48, rope_axes=(8, 12, 12)),
    # the bundled default: TAEF2 latents (32 channels at 1/8 resolution, 2x2 patches = 128-value tokens),
    # 13 M parameters, 26 MB in fp16
    "small": DiTConfig(depth=6, heads=4, head_dim=64, in_channels=32, mlp_ratio=3.0, rope_axes=(16, 24, 24),
                       prediction="residual"),
    # the earlier pixel-space candidate (pixel codec, scale 8: 768-value tokens through a 256-wide model), 9.3 M
    "small-pixel": DiTConfig(depth=4, heads=4, head_dim=64, in_channels=192, mlp_ratio=3.0, rope_axes=(16, 24, 24),
                             prediction="residual"),
    # mid-size, for trainer comparisons that fit one GPU both ways
    "base": DiTConfig(depth=12, heads=12, head_dim=64, in_channels=16, context_dim=None, rope_axes=(16, 24, 24)),
    # Qwen-Image (20.4 B): 60 blocks, 3072 wide, 24 heads, context 3584, 16-channel latent
    "qwen-image": DiTConfig(depth=60, heads=24, head_dim=128, in_channels=16, context_dim=3584),
}


PREDICTIONS = ("velocity", "sample", "residual")
SIGMA_FLOOR = 0.05  # "sample" models: F = (x - D) / max(sigma, SIGMA_FLOOR), so small sigma cannot blow up


def preset(name: str, **overrides) -> DiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class GELUProj(nn.Module):
    """`net.0` of Qwen-Image's FeedForward: Linear + tanh-GELU (key `proj`)."""

    def __init__(self, dim_in: int, dim_out: int, **lin):
        super().__init__()
        self.proj = DualLoRALinear(dim_in, dim_out, **lin)

    def forward(self, x, split=None):
        return F.gelu(self.proj(x, split), approximate="tanh")


class FeedForward(nn.Module):
    """Keys `net.0.proj` and `net.2`, as in Qwen-Image (net.1 is a parameterless dropout slot)."""

    def __init__(self, dim: int, hidden: int, **lin):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, hidden, **lin), nn.Identity(), DualLoRALinear(hidden, dim, **lin)])

    def forward(self, x, split=None):
        return self.net[2](self.net[0](x, split), split)


class Modulation(nn.Sequential):
    """`img_mod` / `txt_mod`: SiLU then Linear to 6 * dim (key `1`)."""

    def __init__(self, dim: int, **lin):
        super().__init__(nn.SiLU(), DualLoRALinear(dim, 6 * dim, **lin))

    def forward(self, emb, split=None):
        return self[1](self[0](emb), split)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int) -> torch.Tensor:
    """x [B, L, D]; shift/scale [B, 2, D]: branch 0 for tokens [0, split), branch 1 after."""
    return torch.cat([torch.addcmul(shift[:, :1], x[:, :split], 1 + scale[:, :1]),
                      torch.addcmul(shift[:, 1:], x[:, split:], 1 + scale[:, 1:])], dim=1)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, split: int) -> torch.Tensor:
    """x + gate * y with a per-branch gate [B, 2, D]."""
    return torch.cat([torch.addcmul(x[:, :split], gate[:, :1], y[:, :split]),
                      torch.addcmul(x[:, split:], gate[:, 1:], y[:, split:])], dim=1)


class Attention(nn.Module):
    """Joint attention over [context | image] with QK RMSNorm and RoPE; Qwen-Image key names."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, img_lin: dict, txt_lin: dict):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_q, self.to_k, self.to_v = (DualLoRALinear(dim, dim, **img_lin) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (DualLoRALinear(dim, dim, **txt_lin) for _ in range(3))
        self.to_out = nn.ModuleList([DualLoRALinear(dim, dim, **img_lin)])
        self.to_add_out = DualLoRALinear(dim, dim, **txt_lin)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, L, Dh]

    def forward(self, img, txt, rope, split):
        q = torch.cat([self.norm_added_q(self._heads(self.add_q_proj(txt))), self.norm_q(self._heads(self.to_q(img, split)))], 2)
        k = torch.cat([self.norm_added_k(self._heads(self.add_k_proj(txt))), self.norm_k(self._heads(self.to_k(img, split)))], 2)
        v = torch.cat([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img, split))], 2)
        cos, sin = rope
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        out = out.transpose(1, 2).flatten(2)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:], split), self.to_add_out(out[:, :n_txt])


class DualBranchBlock(nn.Module):
    """Qwen-Image double-stream block; the image stream's adaLN and LoRA are per branch."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, eps = cfg.width, cfg.eps
        img_lin = dict(ranks=cfg.lora_ranks, alphas=cfg.lora_alphas)
        txt_lin: dict = {}
        hidden = int(dim * cfg.mlp_ratio)
        self.img_mod = Modulation(dim, **img_lin)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim, hidden, **img_lin)
        self.txt_mod = Modulation(dim, **txt_lin)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim, hidden, **txt_lin)
        self.attn = Attention(dim, cfg.heads, cfg.head_dim, eps, img_lin, txt_lin)

    def forward(self, img, txt, emb_branches, emb_txt, rope, split: int):
        """img [B, L, D] (split = #noise tokens); emb_branches [B, 2, D]; emb_txt [B, D]."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = \
            self.img_mod(emb_branches, 1).chunk(6, dim=-1)                       # each [B, 2, D]
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = \
            self.txt_mod(emb_txt[:, None]).chunk(6, dim=-1)                      # each [B, 1, D]

        img_attn, txt_attn = self.attn(
            modulate(self.img_norm1(img), img_shift1, img_scale1, split),
            torch.addcmul(txt_shift1, self.txt_norm1(txt), 1 + txt_scale1), rope, split)
        img = gated_residual(img, img_gate1, img_attn, split)
        txt = torch.addcmul(txt, txt_gate1, txt_attn)

        img_mlp = self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2, split), split)
        img = gated_residual(img, img_gate2, img_mlp, split)
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(torch.addcmul(txt_shift2, self.txt_norm2(txt), 1 + txt_scale2)))
        return img, txt


class OutputLayer(nn.Module):
    """Qwen-Image's `norm_out`: adaLN (scale, shift) from emb(sigma), no affine LayerNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x, emb):
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=-1)
        return torch.addcmul(shift[:, None], self.norm(x), 1 + scale[:, None])


class DualBranchDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if sum(cfg.rope_axes) != cfg.head_dim:
            raise ValueError(f"rope_axes {cfg.rope_axes} must sum to head_dim {cfg.head_dim}")
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {cfg.prediction!r}")
        self.cfg = cfg
        dim = cfg.width
        token_dim = cfg.in_channels * cfg.patch ** 2
        context_dim = cfg.context_dim or dim
        self.img_in = DualLoRALinear(token_dim, dim, ranks=cfg.lora_ranks, alphas=cfg.lora_alphas)
        self.txt_norm = RMSNorm(context_dim, eps=1e-6)
        self.txt_in = DualLoRALinear(context_dim, dim)
        self.time_text_embed = TimestepEmbedder(dim)
        self.time_text_embed_2 = copy.deepcopy(self.time_text_embed)
        self.transformer_blocks = nn.ModuleList(DualBranchBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = OutputLayer(dim, cfg.eps)
        self.proj_out = DualLoRALinear(dim, token_dim)
        if cfg.prediction == "residual":
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
        if cfg.context_dim is None:
            self.null_context = nn.Parameter(torch.randn(cfg.null_context_tokens, dim) * 0.02)
        self.gradient_checkpointing = False

    # ---- token layout -------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, (h/p)(w/p), C p p] in Qwen-Image's channel order."""
        b, c, h, w = x.shape
        p = self.cfg.patch
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, p = tokens.shape[0], self.cfg.patch
        c = tokens.shape[-1] // (p * p)
        return tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def rope(self, h_tok: int, w_tok: int, n_txt: int, branches: int, device, dtype):
        """cos/sin [1, 1, n_txt + branches h w, Dh/2]: context, then noise (and cond) tokens at the same positions."""
        img_ids = image_positions(h_tok, w_tok, device)
        ids = torch.cat([text_positions(n_txt, h_tok, w_tok, device)] + [img_ids] * branches, 0)
        angles = rope_angles(ids[None], self.cfg.rope_axes)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def context_tokens(self, context: torch.Tensor | None, batch: int, dtype) -> torch.Tensor:
        if context is None:
            if self.cfg.context_dim is not None:
                raise ValueError("this model has a text stream: pass `context` [B, T, "
                                 f"{self.cfg.context_dim}] (e.g. from its text encoder)")
            context = self.null_context.to(dtype)[None].expand(batch, -1, -1)
        elif context.shape[-1] != (self.cfg.context_dim or self.cfg.width):
            raise ValueError(f"context has {context.shape[-1]} features, the model expects "
                             f"{self.cfg.context_dim or self.cfg.width}")
        return self.txt_in(self.txt_norm(context.to(dtype)))

    # ---- forward --------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: that of the (never quantised) timestep embedder."""
        return self.time_text_embed.timestep_embedder.linear_1.weight.dtype

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, sigma: torch.Tensor,
                sigma_target: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Average velocity from sigma to sigma_target.

        x: noisy latent [B, C, h, w]; cond: clean LR latent of the same shape, or None to run the
        single-branch base (plain Qwen-Image); sigma [B] in [0, 1]; sigma_target [B] in [-1, 1]
        (negative = the model's own fake flow); context [B, T, ctx] or None.
        """
        if cond is not None and x.shape != cond.shape:
            raise ValueError(f"noise latent {tuple(x.shape)} and condition latent {tuple(cond.shape)} differ")
        b, _, h, w = x.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"latent size {(h, w)} is not a multiple of the patch size {p}")
        dtype = self.compute_dtype
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        sigma_target = sigma_target.expand(b) if sigma_target.ndim == 0 else sigma_target

        tokens = [self.patchify(x.to(dtype))] + ([] if cond is None else [self.patchify(cond.to(dtype))])
        split = tokens[0].shape[1]
        img = self.img_in(torch.cat(tokens, 1), split)
        txt = self.context_tokens(context, b, dtype)
        emb = self.time_text_embed(sigma, dtype)
        emb_branches = torch.stack([emb, self.time_text_embed_2(sigma_target, dtype)], 1)
        rope = self.rope(h // p, w // p, txt.shape[1], len(tokens), x.device, dtype)

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, emb_branches, emb, rope, split, use_reentrant=False)
            else:
                img, txt = block(img, txt, emb_branches, emb, rope, split)

        out = self.unpatchify(self.proj_out(self.norm_out(img[:, :split], emb)), h, w).float()
        if self.cfg.prediction == "residual":
            if cond is None:
                raise ValueError("a residual-prediction model needs the LR condition latent")
            out = out + cond.float()
        if self.cfg.prediction != "velocity":
            out = (x.float() - out) / sigma.float().clamp_min(SIGMA_FLOOR).view(-1, 1, 1, 1)
        return out.to(x.dtype)

    # ---- parameter groups -----------------------------------------------------------------
    def quantize_base_fp8(self) -> None:
        """Store every frozen base Linear of the blocks as fp8 e4m3 (embedders/norms stay)."""
        for m in self.transformer_blocks.modules():
            if isinstance(m, DualLoRALinear):
                m.quantize_fp8()

    def merge_lora(self, branch: str = "noise") -> None:
        for m in self.modules():
            if isinstance(m, DualLoRALinear):
                m.merge_lora(branch)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
