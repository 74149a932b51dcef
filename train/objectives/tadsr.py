"""TAD-SR (He et al. 2024, peers.md 1.3-1.4) on our DiT: the expensive baseline TEASR's design avoids.

It needs three things TEASR does without: a frozen teacher copy of the model, teacher rollouts for
the regression target, and a discriminator (the teacher's first half of blocks as a frozen feature
encoder, plus small time-modulated heads with their own optimizer). Per micro-batch:

    student one step (sigma 1 -> 0)                 1 pass with grad
    teacher rollout from the same noise             teacher_steps passes without grad
    HFSD: teacher on both perturbed outputs         2 passes without grad
    discriminator: teacher encoder, real / fake     1 half pass without grad, 1 with grad (to the student)
    D step (hinge) on the heads, then the G losses

Everything runs on the unwrapped teacher; only the student goes through DDP/FSDP. The heads'
gradients are all-reduced by hand when distributed. With gradient accumulation the discriminator
steps once per micro-batch (TAD-SR's "one D step before each G step").
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from teasr_core.network.embed import sinusoidal_embedding
from teasr_core.network.model import DualBranchDiT
from teasr_core.sampling import sample, shifted_sigmas

from . import PassCounter, gaussian_like, mse, noised, per_sample, uniform


class _FeaturesReady(Exception):
    """Raised by the last tap's hook: the decoder half of the teacher is never run."""


def encoder_taps(depth: int, levels: int) -> list[int]:
    """Block indices whose input hidden states are tapped, spread over the first half of the blocks."""
    if depth < 2:
        raise ValueError("the TAD-SR discriminator needs a teacher with at least 2 blocks")
    half = depth // 2
    return sorted({max(1, round(half * (i + 1) / levels)) for i in range(levels)})


def encoder_features(teacher, taps: list[int], x, cond, sigma) -> list[torch.Tensor]:
    """Noise-token hidden states entering each tapped block: the teacher's "encoder" features.

    Forward pre-hooks record the hidden states and stop the forward at the last tap, so only the
    first half of the blocks runs. Gradients flow through to `x` when autograd is on.
    """
    found = {}

    def tap(index):
        def hook(_module, args):
            found[index] = args[0]
            if index == taps[-1]:
                raise _FeaturesReady
        return hook

    blocks = teacher.model.transformer_blocks
    handles = [blocks[i].register_forward_pre_hook(tap(i)) for i in taps]
    try:
        teacher(x, cond, sigma, sigma)
    except _FeaturesReady:
        pass
    finally:
        for handle in handles:
            handle.remove()
    tokens = (x.shape[-2] // teacher.model.cfg.patch) * (x.shape[-1] // teacher.model.cfg.patch)
    return [found[i][:, :tokens] for i in taps]


class TimeAwareHead(nn.Module):
    """Per-token real/fake logits from one feature level, modulated by the noise level.

    LayerNorm'd features get a (scale, shift) from a sinusoidal embedding of sigma (zero-initialised,
    so training starts from plain normalised features), then an MLP gives one logit per token.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.time = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.time[-1].weight)
        nn.init.zeros_(self.time[-1].bias)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time(sinusoidal_embedding(sigma)).chunk(2, dim=-1)
        h = self.norm(features.float()) * (1 + scale[:, None]) + shift[:, None]
        return self.mlp(h).squeeze(-1)


class TimeAwareDiscriminator(nn.Module):
    """One head per tapped level; logits of all levels concatenated per sample."""

    def __init__(self, dim: int, levels: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(TimeAwareHead(dim, hidden) for _ in range(levels))

    def forward(self, features: list[torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f, sigma) for head, f in zip(self.heads, features)], dim=1)


def loss_regression(x_student, x_teacher) -> torch.Tensor:
    """Distil toward the teacher's multi-step output from the same noise (not toward the GT)."""
    return mse(x_student, x_teacher)


def loss_hfsd(teacher, x_student, x_teacher, cond, generator, sigma_range) -> torch.Tensor:
    """High-frequency score distillation: SDS at small noise, referenced to the teacher's own output.

    Both outputs are perturbed with the same small sigma and noise; the teacher's noise estimates
    eps_hat = x + (1 - sigma) v differ by a direction that cancels the teacher's own bias (plain SDS
    would subtract the true noise). mean(sg[eps_hat(x_s) - eps_hat(x_tch)] * x_s) has exactly that
    gradient; small sigma weights high frequencies.
    """
    b = x_student.shape[0]
    sigma = uniform(b, *sigma_range, generator)
    n = gaussian_like(x_student, generator)
    with torch.no_grad():
        s = per_sample(sigma)
        xs, xt = noised(x_student.detach(), n, sigma), noised(x_teacher, n, sigma)
        direction = (xs + (1 - s) * teacher(xs, cond, sigma, sigma)) - (xt + (1 - s) * teacher(xt, cond, sigma, sigma))
    return torch.mean(direction.float() * x_student.float())


def loss_disc_hinge(real_logits, fake_logits) -> torch.Tensor:
    """Discriminator hinge loss: real above +1, fake below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def loss_gen_hinge(fake_logits) -> torch.Tensor:
    """Generator hinge loss: raise the discriminator's logits on the student's samples."""
    return -fake_logits.mean()


class TadsrObjective:
    """Student one-step loss (regression + HFSD + GAN) with the discriminator step taken inside."""

    def __init__(self, cfg, dit: DualBranchDiT, device):
        self.cfg = cfg
        teacher = copy.deepcopy(dit).requires_grad_(False).eval()
        self.teacher_model = teacher
        self.taps = encoder_taps(teacher.cfg.depth, cfg.disc_levels)
        self.disc = TimeAwareDiscriminator(teacher.cfg.width, len(self.taps), cfg.disc_hidden).to(device)
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas),
                                          weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.sigmas = shifted_sigmas(cfg.teacher_steps)

    def _teacher(self, net: PassCounter, kind: str) -> PassCounter:
        return PassCounter(self.teacher_model, net.counts, kind, net.context)

    def discriminator_step(self, real_features, fake_features, sigma) -> torch.Tensor:
        """One AdamW step of the heads on detached features; returns the hinge loss."""
        self.disc.requires_grad_(True)
        loss = loss_disc_hinge(self.disc(real_features, sigma), self.disc([f.detach() for f in fake_features], sigma))
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized():
            for p in self.disc.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        self.disc_opt.step()
        self.disc.requires_grad_(False)
        return loss.detach()

    def __call__(self, net, x0, cond, hr, generator, backward):
        cfg = self.cfg
        teacher, encoder = self._teacher(net, "fwd"), self._teacher(net, "enc")
        b = x0.shape[0]
        eps = gaussian_like(x0, generator)
        ones, zeros = torch.ones(b, device=x0.device), torch.zeros(b, device=x0.device)
        x_student = eps - net(eps, cond, ones, zeros)
        with torch.no_grad():
            x_teacher = sample(lambda x, s, _target: teacher(x, cond, s, s), eps, self.sigmas, "flowmap")

        l_reg = loss_regression(x_student, x_teacher)
        l_hfsd = loss_hfsd(teacher, x_student, x_teacher, cond, generator, cfg.hfsd_sigma_range)

        sigma_d = uniform(b, *cfg.disc_sigma_range, generator)
        n = gaussian_like(x0, generator)
        with torch.no_grad():
            real = encoder_features(encoder, self.taps, noised(x0, n, sigma_d), cond, sigma_d)
        fake = encoder_features(encoder, self.taps, noised(x_student, n, sigma_d), cond, sigma_d)
        l_disc = self.discriminator_step(real, fake, sigma_d)
        l_gan = loss_gen_hinge(self.disc(fake, sigma_d))

        total = cfg.w_reg * l_reg + cfg.w_hfsd * l_hfsd + cfg.w_gan * l_gan
        terms = {"reg": l_reg, "hfsd": l_hfsd, "gan": l_gan, "disc": l_disc}
        backward(total)
        return total.detach(), {k: v.detach() for k, v in terms.items()}

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.disc_opt.load_state_dict(state["disc_opt"])
