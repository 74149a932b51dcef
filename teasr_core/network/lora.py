"""DualLoRALinear: one frozen base weight shared by two token branches, each with its own LoRA.

The image stream is `[noise tokens | LR-condition tokens]`; `split` is the index of the first
condition token, passed explicitly (never inferred as "half the sequence"). A (B, 2, C) input, as
the modulation layers get from the stacked `[emb(t), emb(t_target)]`, is the same thing with
split=1, which is how each branch gets its own adaLN parameters.

The base weight can be stored as fp8 e4m3 with one scale per output channel, so the stored model
takes half the memory of bf16. It is dequantised per layer and multiplied in the compute dtype: the
dequantisation writes the whole weight anyway, so the LoRA down-projections' rows are appended to it
and computed in the same matmul (`fuse_down`). A real fp8 matmul (`torch._scaled_mm`, activations
quantised per token) is an opt-in (`fp8_matmul`) on GPUs with fp8 units (compute capability 8.9+):
per-row-scaled fp8 matmuls lost to bf16 at this model's sizes (BENCHMARKS.md, H200).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BRANCHES = ("noise", "cond")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
log = logging.getLogger("teasr")


def fp8_matmul_available(x: torch.Tensor) -> bool:
    """Whether x can go through a real fp8 matmul: bf16 on a GPU with fp8 matrix units (CUDA 8.9+)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 9)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's when it is on (the base weight is made in it directly,
    not first in x's fp32 and then cast again by autocast), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class _ScaledFP8Linear(torch.autograd.Function):
    """rows [N, in] times W^T, W fp8 [out, in] with a per-output-channel scale: forward as a real fp8
    matmul with the rows quantised one by one; backward (input gradient only: W is frozen) with W
    dequantised."""

    @staticmethod
    def forward(ctx, rows, weight, scale):
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        rows_fp8 = (rows / row_scale.to(rows.dtype)).to(FP8)
        ctx.save_for_backward(weight, scale)
        return torch._scaled_mm(rows_fp8, weight.t(), scale_a=row_scale, scale_b=scale.float()[None],
                                out_dtype=rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad @ (weight.to(grad.dtype) * scale.to(grad.dtype)[:, None]), None, None


class _BaseAndDown(torch.autograd.Function):
    """x @ [W; A_1; ...]^T in one matmul, W an fp8 base dequantised into the stacked weight: the frozen
    base product followed by the LoRA down-projections' columns. Backward: the input gradient in one
    matmul through the stacked weight, each A's gradient from its own tokens only, never W's (frozen)."""

    @staticmethod
    def forward(ctx, x, weight, scale, token_ranges, *downs):
        dtype = x.dtype
        rows = weight.shape[0]
        stacked = torch.empty(rows + sum(a.shape[0] for a in downs), weight.shape[1], dtype=dtype, device=x.device)
        torch.mul(weight.to(dtype), scale.to(dtype)[:, None], out=stacked[:rows])
        start = rows
        for a in downs:
            stacked[start:start + a.shape[0]] = a
            start += a.shape[0]
        ctx.save_for_backward(x, stacked)
        ctx.rows, ctx.token_ranges = rows, token_ranges
        ctx.downs = [(a.shape[0], a.dtype) for a in downs]
        return F.linear(x, stacked)

    @staticmethod
    def backward(ctx, grad):
        x, stacked = ctx.saved_tensors
        grad = grad.to(stacked.dtype)
        grad_x = grad @ stacked if ctx.needs_input_grad[0] else None
        grad_downs, start = [], ctx.rows
        for (lo, hi), (rank, dtype) in zip(ctx.token_ranges, ctx.downs):
            g, xs = grad[..., lo:hi, start:start + rank], x[..., lo:hi, :]
            grad_downs.append((g.reshape(-1, rank).t() @ xs.reshape(-1, xs.shape[-1])).to(dtype))
            start += rank
        return grad_x, None, None, None, *grad_downs


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
        self.fp8_matmul = False     # opt-in (see the module's doc); turned off for good if _scaled_mm refuses a layer
        self.fuse_down = True       # an fp8 base's dequantised weight carries the LoRA A rows (one matmul)
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

    def active_branches(self, split: int | None, length: int) -> list[tuple[int, int, int]]:
        """(branch, first token, end token) of each LoRA that changes the output here: present, scaled by
        non-zero, and with tokens; a LoRA scaled by zero costs nothing."""
        if split is None:
            return []
        return [(k, lo, hi) for k, (lo, hi) in enumerate(((0, split), (split, length)))
                if getattr(self, f"lora_{BRANCHES[k]}_A") is not None and self.alphas[k] != 0 and hi > lo]

    def forward(self, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """x: [..., L, in]. Tokens [0, split) take the noise LoRA, [split, L) the cond LoRA.

        split=None means "no branches here" (the text stream): base only.
        """
        bias = None if self.bias is None else self.bias.to(x.dtype)
        branches = self.active_branches(split, x.shape[-2])
        if self.is_fp8 and self.fp8_matmul and fp8_matmul_available(x):
            y = self._fp8_product(x, bias)
            if y is not None:
                return self._add_lora(y, x, branches)
        if self.is_fp8 and self.fuse_down and branches:
            return self._fused_product(x, bias, branches)
        return self._add_lora(F.linear(x, self.base_weight(matmul_dtype(x)), bias), x, branches)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, branches, downs=None) -> torch.Tensor:
        """y plus s_k B_k h_k on each branch's tokens; h_k = A_k x unless given (`downs`, fused)."""
        for i, (k, lo, hi) in enumerate(branches):
            h = F.linear(x[..., lo:hi, :], getattr(self, f"lora_{BRANCHES[k]}_A").to(x.dtype)) if downs is None else downs[i]
            delta = F.linear(h, getattr(self, f"lora_{BRANCHES[k]}_B").to(x.dtype))
            y[..., lo:hi, :] += self.lora_scale(k) * delta
        return y

    def _fused_product(self, x: torch.Tensor, bias, branches) -> torch.Tensor:
        """The base product and the down-projections as one matmul on [W; A_noise; A_cond]."""
        dtype = matmul_dtype(x)
        lo_hi = [(lo, hi) for _, lo, hi in branches]
        downs = [getattr(self, f"lora_{BRANCHES[k]}_A") for k, _, _ in branches]
        with torch.autocast(x.device.type, enabled=False):
            out = _BaseAndDown.apply(x.to(dtype), self.weight, self.weight_scale, lo_hi, *downs)
            y = out[..., :self.out_features]
            y = y + bias.to(dtype) if bias is not None else y.contiguous()
            start, hs = self.out_features, []
            for (lo, hi), a in zip(lo_hi, downs):
                hs.append(out[..., lo:hi, start:start + a.shape[0]])
                start += a.shape[0]
            return self._add_lora(y, x.to(dtype), branches, hs)

    def _fp8_product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The base product as a real fp8 matmul, or None (then never again for this layer) where
        torch._scaled_mm refuses it: a shape or dtype this GPU's kernels do not take."""
        try:    # 2-D in and out: the LoRA terms are added in place to a plain view of the result
            y = _ScaledFP8Linear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale)
            y = y.view(*x.shape[:-1], self.out_features)
        except RuntimeError as e:
            log.warning("TEASR: no fp8 matmul for a %s layer (%s); dequantising its weight instead",
                        tuple(self.weight.shape), str(e).splitlines()[0])
            self.fp8_matmul = False
            return None
        return y if bias is None else y + bias

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
