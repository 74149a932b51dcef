"""TEASR's self-adversarial distillation inside one model (teasr-paper.md 4.2, TwinFlow family).

There is no teacher, no fake-score network and no discriminator: the model at positive target time
is the real-data flow, at negative target time the flow of its own one-step samples, and the
difference of the two is the rectification signal. Per micro-batch:

    x0 = codec.encode(HR), cond = codec.encode(bicubic-up LR): encoded once, shared by every term.

    term     passes with grad       passes without grad
    L_any    1 (F)                  rcgm_substeps (target from the model's own flow map)
    L_e2e    1 (F_fake)             rcgm_substeps
    L_FM     1
    L_adv    1 (fake flow)
    L_rect   -                      1 (real flow); its fake-flow pass is L_adv's, detached
    jump     -                      - (regresses L_e2e's jump to the HR latent)
    pixel    codec.decode + MSE / L1 / perceptual distance on x_fake, or a window of it (no network pass)

so 4 passes with grad and 2 * rcgm_substeps + 1 = 5 without (the precursor draws separate noise
for L_adv and L_rect and needs 6). Sharing is exact: L_rect needs F(x', s', -s') at
x' = (1 - s') x_fake + s' n without grad, which is the value of L_adv's prediction when both use
the same (s', n); only their noise draws become shared.

The model draws no random numbers in its forward pass (no dropout), so the target passes see the
same "RNG" as the prediction trivially; the precursor restores the CUDA RNG state for that reason.
"""
from __future__ import annotations

import torch

from typing import NamedTuple

from . import gaussian_like, mse, noised, per_sample, sigma_weight, uniform


@torch.no_grad()
def rcgm_target(net, x_t, cond, v_star, sigma, target, prediction, dt: float, substeps: int) -> torch.Tensor:
    """RCGM's recursive consistency target for the average velocity `prediction` from sigma to target.

    Why: a flow map must agree with itself; jumping sigma -> target in one call must land where a
    short exact step (dt along the sample's own path, v*) followed by `substeps` Euler steps of the
    model's own flow map lands. The residual R of that identity, clamped to [-1, 1], is subtracted
    from sg(prediction), so the loss gradient is the clamped residual. Intervals shorter than dt
    reduce to flow matching (R = F - v*).
    """
    gap = sigma - target
    start = torch.maximum(sigma - dt, target)
    x = x_t - dt * v_star                       # exactly the path point at sigma - dt
    displacement = torch.zeros_like(x_t)
    for i in range(substeps):
        s_cur = start + (target - start) * (i / substeps)
        s_next = start + (target - start) * ((i + 1) / substeps)
        step = per_sample(s_cur - s_next) * net(x, cond, s_cur, s_next)
        x = x - step
        displacement = displacement + step
    far = gap >= dt
    c_left = per_sample(torch.where(far, gap / dt, torch.ones_like(gap)))
    c_right = per_sample(torch.where(far, torch.full_like(gap, 1 / dt), 1 / gap))
    residual = c_left * prediction - c_right * displacement - v_star
    return prediction.detach() - residual.clamp(-1, 1)


def loss_any(net, x0, cond, generator, cfg) -> torch.Tensor:
    """L_any: consistency of jumps between arbitrary noise levels, so any step count samples well.

    sigma ~ U(0, 1) clamped to >= any_sigma_min, target ~ U(0, sigma - 1e-3).
    """
    b = x0.shape[0]
    sigma = uniform(b, 0, 1, generator).clamp_min(cfg.any_sigma_min)
    target = uniform(b, 0, 1, generator) * (sigma - 1e-3)
    eps = gaussian_like(x0, generator)
    x_t, v_star = noised(x0, eps, sigma), eps - x0
    prediction = net(x_t, cond, sigma, target)
    return mse(prediction, rcgm_target(net, x_t, cond, v_star, sigma, target, prediction,
                                       cfg.rcgm_dt, cfg.rcgm_substeps), sigma_weight(sigma, cfg.sigma_weight_c))


class OneStep(NamedTuple):
    """L_e2e's draw and jump: what the regression, rectification and pixel terms share."""

    loss: torch.Tensor | None   # L_e2e (None when w_e2e = 0)
    velocity: torch.Tensor      # F(x_t, sigma, 0), with grad
    sample: torch.Tensor        # x_t - sigma F: the one-step sample, with grad
    sigma: torch.Tensor         # [B] start noise levels
    v_star: torch.Tensor        # eps - x0: the exact jump's velocity


def loss_e2e(net, x0, cond, generator, cfg):
    """L_e2e: one-step consistency to sigma_target = 0 from a start drawn over all noise levels.

    Why: drawing the start sigma at random (timestep-aware) rather than always 1 trains the
    one-step jump that every step of any-step sampling takes from its own noise level. A share
    `e2e_pure_noise_share` of the starts is exactly sigma = 1, the start of every sample: drawn
    uniformly it is almost never trained, while the pixel terms on easy low-sigma starts look good
    (the first CPU runs: training MSE fell, 1-step results stayed below bicubic). The sample
    x_t - sigma F keeps its gradient for the regression, rectification and pixel terms. With
    w_e2e = 0 only the jump is made (loss None): those terms still score it.
    """
    b = x0.shape[0]
    sigma = uniform(b, *cfg.e2e_sigma_range, generator)
    pure_noise = uniform(b, 0, 1, generator) < cfg.e2e_pure_noise_share
    sigma = torch.where(pure_noise, torch.ones_like(sigma), sigma)
    target = torch.zeros_like(sigma)
    eps = gaussian_like(x0, generator)
    x_t, v_star = noised(x0, eps, sigma), eps - x0
    f_fake = net(x_t, cond, sigma, target)
    loss = None
    if cfg.w_e2e > 0:
        loss = mse(f_fake, rcgm_target(net, x_t, cond, v_star, sigma, target, f_fake, cfg.rcgm_dt, cfg.rcgm_substeps),
                   sigma_weight(sigma, cfg.sigma_weight_c))
    return OneStep(loss, f_fake, x_t - per_sample(sigma) * f_fake, sigma, v_star)


def loss_fm(net, x0, cond, generator, cfg) -> torch.Tensor:
    """L_FM: plain flow matching on short intervals, anchoring the real (positive-time) flow to data.

    sigma ~ U(0, 1), sigma_target = sigma - U(0, fm_gap * sigma); target v* = eps - x0.
    """
    b = x0.shape[0]
    sigma = uniform(b, 0, 1, generator)
    target = sigma - uniform(b, 0, cfg.fm_gap, generator) * sigma
    eps = gaussian_like(x0, generator)
    return mse(net(noised(x0, eps, sigma), cond, sigma, target), eps - x0, sigma_weight(sigma, cfg.sigma_weight_c))


def loss_adv(net, x_fake, cond, generator, cfg):
    """L_adv: teach the negative-time branch the flow of the model's own one-step samples.

    Why: with F(x, s, -s) ~ the fake data's velocity and F(x, s, s) the real one, their difference
    is a fake-minus-real score the generator can descend (L_rect), with no extra network.
    x' = (1 - s) sg(x_fake) + s z, predict at sigma = s, signed target -s, regress to z - sg(x_fake).
    Returns (loss, detached prediction, x', s) for L_rect, which reuses this pass.
    """
    fake = x_fake.detach()
    sigma = uniform(fake.shape[0], *cfg.fake_sigma_range, generator)
    z = gaussian_like(fake, generator)
    x_noised = noised(fake, z, sigma)
    prediction = net(x_noised, cond, sigma, -sigma)
    return mse(prediction, z - fake, sigma_weight(sigma, cfg.sigma_weight_c)), prediction.detach(), x_noised, sigma


def loss_rect(net, f_fake, fake_velocity, x_noised, sigma, cond, clamp: float = 0.0) -> torch.Tensor:
    """L_rect: push one-step samples from the fake toward the real distribution.

    dv = F(x', s, -s) - F(x', s, s) (both without grad; the fake one comes from L_adv's pass) is a
    DMD-style fake-minus-real direction; MSE(F_fake, sg(F_fake - dv)) has gradient 2 dv / N on F_fake.
    Its value, mean(dv^2), measures the fake-real gap rather than a fit. clamp > 0 bounds each
    element of dv to [-clamp, clamp] (TwinFlow's code uses 1): while the fake branch is untrained,
    raw dv is large and noisy, and once it fits it vanishes; the clamp keeps each push bounded.
    """
    with torch.no_grad():
        dv = fake_velocity - net(x_noised, cond, sigma, sigma)
        if clamp > 0:
            dv = dv.clamp(-clamp, clamp)
    return mse(f_fake, (f_fake - dv).detach())


def pixel_window(latent: torch.Tensor, hr: torch.Tensor, window: int, margin: int, scale: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]:
    """A random window of `window` latent pixels per side: (latent window with up to `margin` of context
    around it inside the crop, the HR pixels of the window, the slices that crop the decoded context off).

    Why: the decoder's receptive field is bounded (TAEF2: ~8 latent pixels of context change a
    decode by < 4/255), so decoding a window plus a margin gives nearly the pixels a whole decode
    gives there, and the decoder and perceptual network run on a fraction of the crop.
    """
    h, w = latent.shape[-2:]
    if window >= min(h, w):
        return latent, hr, (slice(None), slice(None))
    y, x = (int(torch.randint(0, n - window + 1, (1,), generator=generator, device=generator.device)) for n in (h, w))
    y0, x0 = max(0, y - margin), max(0, x - margin)
    y1, x1 = min(h, y + window + margin), min(w, x + window + margin)
    crop = (slice((y - y0) * scale, (y - y0 + window) * scale), slice((x - x0) * scale, (x - x0 + window) * scale))
    return (latent[..., y0:y1, x0:x1], hr[..., y * scale:(y + window) * scale, x * scale:(x + window) * scale], crop)


def loss_pixel(codec, perceptual, x_fake, hr, sigma_e2e, cfg, generator) -> dict[str, torch.Tensor]:
    """Pixel MSE (on [-1, 1] images), L1 (on [0, 1]) and perceptual distance of the decoded one-step sample.

    Why: latent consistency alone says nothing about perceived detail; these anchor the one-step
    output to the ground truth. Each sample is weighted by 1 - (1 - pixel_weight_at_noise) sigma_e2e:
    starts close to the data must reproduce it; how much a start from pure noise must is a choice
    (the precursor: not at all; super-resolution from one step at sigma = 1: fully, since that is
    the start the 1-step sampler uses). Scored on a `pixel_window` of the crop when one is set.
    Returns the weighted means of the terms whose weight is > 0 (`perceptual` None: no perceptual term).
    """
    rows = cols = slice(None)
    if cfg.pixel_window:
        x_fake, hr, (rows, cols) = pixel_window(x_fake, hr, cfg.pixel_window, cfg.pixel_margin, codec.scale, generator)
    image = codec.decode(x_fake).float()[..., rows, cols]
    weight = 1 - (1 - cfg.pixel_weight_at_noise) * sigma_e2e.float()
    terms = {}
    if cfg.w_mse > 0:
        terms["pix_mse"] = (weight * (2 * (image - hr)).pow(2).flatten(1).mean(1)).mean()
    if cfg.w_l1 > 0:
        terms["pix_l1"] = (weight * (image - hr).abs().flatten(1).mean(1)).mean()
    if perceptual is not None:
        with torch.autocast(image.device.type, enabled=False):  # the perceptual network in fp32
            terms["pix_lpips"] = (weight * perceptual(image, hr)).mean()
    return terms


PIXEL_WEIGHTS = {"pix_mse": "w_mse", "pix_l1": "w_l1", "pix_lpips": "w_lpips"}   # term -> its config weight


def batch_parts(batch: int, cfg) -> tuple[slice, slice, slice]:
    """The samples L_any, L_FM and the one-step terms (L_e2e and what reuses its jump) each see.

    Every term sees the whole micro-batch, or with `split_batch` (TwinFlow's recipe) L_any and L_FM
    a quarter each and the one-step terms the other half: the step then costs about as much as two
    full-batch passes instead of four, for the same number of samples.
    """
    everything = slice(None)
    if not cfg.split_batch:
        return everything, everything, everything
    quarter = batch // 4
    return slice(0, quarter), slice(quarter, 2 * quarter), slice(2 * quarter, None)


class TeasrObjective:
    """The weighted sum of the terms above; weights and noise-level ranges from the config.

    Terms weighted 0 are not computed (nor logged), so an ablation also saves their passes; L_adv's
    pass still runs, without grad, when only L_rect needs it. `lpips` (the perceptual network,
    `perceptual_net`) is None when its weights are absent (the trainer logs that) or w_lpips = 0.
    """

    def __init__(self, cfg, codec, lpips):
        self.cfg, self.codec = cfg, codec
        self.lpips = lpips if cfg.w_lpips > 0 else None

    def __call__(self, net, x0, cond, hr, generator):
        cfg = self.cfg
        terms = {}
        any_part, fm_part, one_part = batch_parts(x0.shape[0], cfg)
        fm_x0, fm_cond = x0[fm_part], cond[fm_part]
        if cfg.w_any > 0:
            terms["any"] = loss_any(net, x0[any_part], cond[any_part], generator, cfg)
        x0, cond, hr = x0[one_part], cond[one_part], hr[one_part]
        one = loss_e2e(net, x0, cond, generator, cfg)
        if one.loss is not None:
            terms["e2e"] = one.loss
        if cfg.w_jump > 0:
            terms["jump"] = mse(one.velocity, one.v_star, sigma_weight(one.sigma, cfg.sigma_weight_c))
        if cfg.w_fm > 0:
            terms["fm"] = loss_fm(net, fm_x0, fm_cond, generator, cfg)
        if cfg.w_adv > 0 or cfg.w_rect > 0:
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.w_adv > 0):
                l_adv, fake_velocity, x_noised, sigma_fake = loss_adv(net, one.sample, cond, generator, cfg)
            if cfg.w_adv > 0:
                terms["adv"] = l_adv
            if cfg.w_rect > 0:
                terms["rect"] = loss_rect(net, one.velocity, fake_velocity, x_noised, sigma_fake, cond, cfg.rect_clamp)
        total = sum(getattr(cfg, f"w_{name}") * value for name, value in terms.items())
        if cfg.w_mse > 0 or cfg.w_l1 > 0 or self.lpips is not None:
            pixel = loss_pixel(self.codec, self.lpips, one.sample, hr, one.sigma, cfg, generator)
            terms.update(pixel)
            total = total + sum(getattr(cfg, PIXEL_WEIGHTS[name]) * value for name, value in pixel.items())
        return total, {k: v.detach() for k, v in terms.items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
