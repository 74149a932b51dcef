"""DualLoRALinear: one frozen base weight shared by two token branches, each with its own LoRA.

The image stream is `[noise tokens | LR-condition tokens]`; `split` is the index of the first
condition token, passed explicitly (never inferred as "half the sequence"). A (B, 2, C) input, as
the modulation layers get from the stacked `[emb(t), emb(t_target)]`, is the same thing with
split=1, which is how each branch gets its own adaLN parameters.

The base weight can be stored as fp8 e4m3 with one scale per output channel; it is dequantised to
the compute dtype per call, so the stored model takes half the memory of bf16.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BRANCHES = ("noise", "cond")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class DualLoRALinear(nn.Module):
    """y = W x + b, plus s_k * B_k A_k x on the tokens of branch k (k = noise, cond).

    A LoRA of rank 0 is absent. A ~ N(0, 1/r) and B = 0, so a fresh adapter leaves the base
    function unchanged; scale s = alpha / rank.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 ranks: tuple[int, int] = (0, 0), alphas: tuple[float, float] | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.register_buffer("weight_scale", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.ranks = tuple(ranks)
        self.alphas = tuple(alphas) if alphas is not None else tuple(float(r) for r in ranks)
        for branch, rank in zip(BRANCHES, self.ranks):
            if rank:
                a = torch.randn(rank, in_features, device=device, dtype=dtype) / math.sqrt(rank)
                setattr(self, f"lora_{branch}_A", nn.Parameter(a))
                setattr(self, f"lora_{branch}_B", nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype)))
            else:
                setattr(self, f"lora_{branch}_A", None)
                setattr(self, f"lora_{branch}_B", None)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, ranks={self.ranks}, "
                f"base={'fp8' if self.is_fp8 else self.weight.dtype}")

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8

    def lora_scale(self, branch: int) -> float:
        return self.alphas[branch] / self.ranks[branch]

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight in `dtype`, dequantised if stored as fp8."""
        if self.is_fp8:
            return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """x: [..., L, in]. Tokens [0, split) take the noise LoRA, [split, L) the cond LoRA.

        split=None means "no branches here" (the text stream): base only.
        """
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.base_weight(x.dtype), bias)
        if split is None:
            return y
        length = x.shape[-2]
        for branch, (lo, hi) in enumerate(((0, split), (split, length))):
            a = getattr(self, f"lora_{BRANCHES[branch]}_A")
            if a is None or hi <= lo:
                continue
            b = getattr(self, f"lora_{BRANCHES[branch]}_B")
            delta = F.linear(F.linear(x[..., lo:hi, :], a.to(x.dtype)), b.to(x.dtype))
            y[..., lo:hi, :] += self.lora_scale(branch) * delta
        return y

    # ---- storage -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Let .to(device) move an fp8 base, but never let .to(dtype) cast it (or its scales):
        a plain cast of fp8 codes to bf16 would silently drop the per-channel scale."""
        keep = {id(self.weight), id(self.weight_scale)} if self.is_fp8 else set()

        def guarded(t):
            out = fn(t)
            return t.to(device=out.device) if id(t) in keep and out.dtype != t.dtype else out

        return super()._apply(guarded, recurse)

    @torch.no_grad()
    def quantize_fp8(self) -> None:
        """Store the base weight as fp8 e4m3 with a per-output-channel fp32 scale."""
        if self.is_fp8:
            return
        w = self.weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        self.weight = nn.Parameter((w / scale[:, None]).to(FP8), requires_grad=False)
        self.weight_scale = scale

    @torch.no_grad()
    def merge_lora(self, branch: str = "noise") -> None:
        """Fold one branch's LoRA into the base weight, exactly preserving both branches' outputs.

        The other branch is re-expressed relative to the new base as a LoRA of rank r_self + r_other
        ([A_other; A_self], [s_o B_other, -s_s B_self]); the merged branch then costs no LoRA compute.
        """
        k = BRANCHES.index(branch)
        a_k, b_k = getattr(self, f"lora_{branch}_A"), getattr(self, f"lora_{branch}_B")
        if a_k is None:
            return
        was_fp8 = self.is_fp8
        base_dtype = torch.float32 if was_fp8 else self.weight.dtype
        delta = self.lora_scale(k) * (b_k.float() @ a_k.float())
        merged = self.base_weight(torch.float32) + delta
        other = BRANCHES[1 - k]
        a_o, b_o = getattr(self, f"lora_{other}_A"), getattr(self, f"lora_{other}_B")
        dtype = a_k.dtype
        if a_o is not None:
            new_a = torch.cat([a_o.float(), a_k.float()], 0)
            new_b = torch.cat([self.lora_scale(1 - k) * b_o.float(), -self.lora_scale(k) * b_k.float()], 1)
        else:
            new_a, new_b = a_k.float(), -self.lora_scale(k) * b_k.float()
        rank = new_a.shape[0]
        setattr(self, f"lora_{other}_A", nn.Parameter(new_a.to(dtype)))
        setattr(self, f"lora_{other}_B", nn.Parameter(new_b.to(dtype)))
        setattr(self, f"lora_{branch}_A", None)
        setattr(self, f"lora_{branch}_B", None)
        ranks, alphas = list(self.ranks), list(self.alphas)
        ranks[k], alphas[k] = 0, 0.0
        ranks[1 - k], alphas[1 - k] = rank, float(rank)
        self.ranks, self.alphas = tuple(ranks), tuple(alphas)
        self.weight_scale = None
        self.weight = nn.Parameter(merged.to(base_dtype), requires_grad=False)
        if was_fp8:
            self.quantize_fp8()


def dual_lora_layers(module: nn.Module):
    """(name, layer) for every DualLoRALinear below `module`."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, DualLoRALinear)]
