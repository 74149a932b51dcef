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
for L_adv and L_rect and needs 6); `stack_passes` runs the 5 as rcgm_substeps = 2 calls. Sharing is exact: L_rect needs F(x', s', -s') at
x' = (1 - s') x_fake + s' n without grad, which is the value of L_adv's prediction when both use
the same (s', n); only their noise draws become shared.

The model draws no random numbers in its forward pass (no dropout), so the target passes see the
same "RNG" as the prediction trivially; the precursor restores the CUDA RNG state for that reason.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from teasr_core.sampling import sampler_step, shifted_sigmas

from . import Pass, gaussian_like, mse, noised, one_by_one, per_sample, sigma_weight, stacked, uniform


class Draw(NamedTuple):
    """One term's random draw: the prediction is made at x_t from sigma to target; v_star = eps - x0.

    `regress` [B] scales the regressions of a one-step draw (latent e2e / jump, pixel MSE / L1) per
    sample, leaving the perceptual and adversarial terms whole; None = 1 everywhere.
    """

    x_t: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    v_star: torch.Tensor
    regress: torch.Tensor | None = None

    def regression_weight(self, c: float) -> torch.Tensor | None:
        """sigma_weight times `regress` (None: unweighted)."""
        weight = sigma_weight(self.sigma, c)
        if self.regress is None:
            return weight
        return self.regress if weight is None else weight * self.regress

    def as_pass(self, cond) -> Pass:
        return Pass(self.x_t, cond, self.sigma, self.target)


def draw_any(x0, generator, cfg) -> Draw:
    """L_any's: sigma ~ U(0, 1) clamped to >= any_sigma_min, target ~ U(0, sigma - 1e-3)."""
    b = x0.shape[0]
    sigma = uniform(b, 0, 1, generator).clamp_min(cfg.any_sigma_min)
    target = uniform(b, 0, 1, generator) * (sigma - 1e-3)
    eps = gaussian_like(x0, generator)
    return Draw(noised(x0, eps, sigma), sigma, target, eps - x0)


def draw_e2e(x0, generator, cfg) -> Draw:
    """L_e2e's: a start over all noise levels (a share exactly at sigma = 1), target 0 (see loss_e2e)."""
    b = x0.shape[0]
    sigma = uniform(b, *cfg.e2e_sigma_range, generator)
    pure_noise = uniform(b, 0, 1, generator) < cfg.e2e_pure_noise_share
    sigma = torch.where(pure_noise, torch.ones_like(sigma), sigma)
    eps = gaussian_like(x0, generator)
    return Draw(noised(x0, eps, sigma), sigma, torch.zeros_like(sigma), eps - x0)


def own_path_states(steps) -> list[tuple[int, int]]:
    """Every distinct (k, i) state of the own path: after i of k steps; i = 0 (the start) is the same for all k."""
    return [(1, 0)] + sorted({(k, i) for k in steps for i in range(1, k)})


@torch.no_grad()
def draw_own_path(net, x0, cond, generator, cfg) -> Draw:
    """One-step starts where the `jump` sampler really is: after i of k steps from the noised condition.

    Why: the forward-noised HR the other draws use is not what the sampler meets. Its start is the
    condition (the encoded bicubic) noised to own_path_start, and every later state holds its own
    previous estimate; trained only on the former, the later steps of the uniform grid add grain
    instead of detail (BENCHMARKS.md, "Many-step ceiling"). A jump from such a state to 0 must
    still land on x0, so v* = (x_t - x0) / sigma: the straight path from x0 through x_t.
    """
    states = own_path_states(cfg.own_path_steps)
    pick = torch.randint(len(states), (x0.shape[0],), generator=generator, device=generator.device).tolist()
    grids = [shifted_sigmas(k, start=cfg.own_path_start).to(x0.device) for k, _ in (states[j] for j in pick)]
    todo = [states[j][1] for j in pick]
    x = noised(cond, gaussian_like(x0, generator), torch.full((x0.shape[0],), cfg.own_path_start, device=x0.device))
    for step in range(max(todo)):
        rows = [b for b, n in enumerate(todo) if n > step]
        sigma = torch.stack([grids[b][step] for b in rows])
        nxt = torch.stack([grids[b][step + 1] for b in rows])
        velocity = net(x[rows], cond[rows], sigma, torch.zeros_like(sigma))
        x[rows] = sampler_step("jump", x[rows], velocity.to(x.dtype), per_sample(sigma), per_sample(nxt))
    sigma = torch.stack([grids[b][n] for b, n in enumerate(todo)])
    regress = torch.tensor([1.0 if n == 0 else cfg.own_path_regression for n in todo], device=x0.device)
    return Draw(x, sigma, torch.zeros_like(sigma), (x - x0) / per_sample(sigma), regress)


def draw_one_step(net, x0, cond, generator, cfg) -> Draw:
    """L_e2e's draw, a share `own_path_share` of it replaced by starts on the sampler's own path."""
    d = draw_e2e(x0, generator, cfg)
    if cfg.own_path_share <= 0:
        return d
    own = (uniform(x0.shape[0], 0, 1, generator) < cfg.own_path_share).nonzero().flatten()
    if own.numel() == 0:
        return d
    o = draw_own_path(net, x0[own], cond[own], generator, cfg)
    x_t, sigma, target, v_star = (t.clone() for t in d[:4])
    x_t[own], sigma[own], target[own], v_star[own] = o.x_t.to(x_t.dtype), o.sigma, o.target, o.v_star.to(v_star.dtype)
    regress = torch.ones_like(sigma)
    regress[own] = o.regress
    return Draw(x_t, sigma, target, v_star, regress)


def draw_fm(x0, generator, cfg) -> Draw:
    """L_FM's: sigma ~ U(0, 1), sigma_target = sigma - U(0, fm_gap * sigma)."""
    b = x0.shape[0]
    sigma = uniform(b, 0, 1, generator)
    target = sigma - uniform(b, 0, cfg.fm_gap, generator) * sigma
    eps = gaussian_like(x0, generator)
    return Draw(noised(x0, eps, sigma), sigma, target, eps - x0)


def draw_fake(like: torch.Tensor, generator, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """L_adv's re-noising of the one-step sample (shaped like `like`): (sigma, z)."""
    sigma = uniform(like.shape[0], *cfg.fake_sigma_range, generator)
    return sigma, gaussian_like(like, generator)


@torch.no_grad()
def rcgm_displacements(call, chains: list[tuple[Draw, torch.Tensor]], dt: float, substeps: int,
                       extra: list[Pass] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The displacement of every RCGM chain (see rcgm_target), all chains advanced together, and the
    outputs of the `extra` independent passes, which join the chains' first call.

    `call(passes) -> outputs` is `stacked` (one network call per sub-step) or `one_by_one`.
    """
    states = []
    for draw, cond in chains:
        start = torch.maximum(draw.sigma - dt, draw.target)
        states.append([draw.x_t - dt * draw.v_star, torch.zeros_like(draw.x_t), start])  # exactly the path at sigma - dt
    extra_out: list[torch.Tensor] = []
    for i in range(substeps):
        passes, steps = [], []
        for (draw, cond), (x, _, start) in zip(chains, states):
            s_cur = start + (draw.target - start) * (i / substeps)
            s_next = start + (draw.target - start) * ((i + 1) / substeps)
            passes.append(Pass(x, cond, s_cur, s_next))
            steps.append(per_sample(s_cur - s_next))
        todo = passes + (list(extra) if i == 0 else [])
        if not todo:
            break
        out = call(todo)
        for state, step, velocity in zip(states, steps, out):
            state[0] = state[0] - step * velocity
            state[1] = state[1] + step * velocity
        if i == 0:
            extra_out = out[len(passes):]
    return [state[1] for state in states], extra_out


def rcgm_combine(prediction, displacement, draw: Draw, dt: float) -> torch.Tensor:
    """The RCGM target from the chain's displacement (see rcgm_target)."""
    gap = draw.sigma - draw.target
    far = gap >= dt
    c_left = per_sample(torch.where(far, gap / dt, torch.ones_like(gap)))
    c_right = per_sample(torch.where(far, torch.full_like(gap, 1 / dt), 1 / gap))
    residual = c_left * prediction.detach() - c_right * displacement - draw.v_star
    return prediction.detach() - residual.clamp(-1, 1)


@torch.no_grad()
def rcgm_target(net, x_t, cond, v_star, sigma, target, prediction, dt: float, substeps: int) -> torch.Tensor:
    """RCGM's recursive consistency target for the average velocity `prediction` from sigma to target.

    Why: a flow map must agree with itself; jumping sigma -> target in one call must land where a
    short exact step (dt along the sample's own path, v*) followed by `substeps` Euler steps of the
    model's own flow map lands. The residual R of that identity, clamped to [-1, 1], is subtracted
    from sg(prediction), so the loss gradient is the clamped residual. Intervals shorter than dt
    reduce to flow matching (R = F - v*).
    """
    draw = Draw(x_t, sigma, target, v_star)
    (displacement,), _ = rcgm_displacements(partial(one_by_one, net), [(draw, cond)], dt, substeps)
    return rcgm_combine(prediction, displacement, draw, dt)


def loss_any(net, x0, cond, generator, cfg) -> torch.Tensor:
    """L_any: consistency of jumps between arbitrary noise levels, so any step count samples well."""
    d = draw_any(x0, generator, cfg)
    prediction = net(*d.as_pass(cond))
    return mse(prediction, rcgm_target(net, d.x_t, cond, d.v_star, d.sigma, d.target, prediction,
                                       cfg.rcgm_dt, cfg.rcgm_substeps), sigma_weight(d.sigma, cfg.sigma_weight_c))


class OneStep(NamedTuple):
    """L_e2e's draw and jump: what the regression, rectification and pixel terms share."""

    loss: torch.Tensor | None   # L_e2e (None when w_e2e = 0)
    velocity: torch.Tensor      # F(x_t, sigma, 0), with grad
    sample: torch.Tensor        # x_t - sigma F: the one-step sample, with grad
    draw: Draw                  # its start: x_t, sigma [B], target 0, v* (the exact jump's velocity), regress


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
    d = draw_one_step(net, x0, cond, generator, cfg)
    f_fake = net(*d.as_pass(cond))
    loss = None
    if cfg.w_e2e > 0:
        loss = mse(f_fake, rcgm_target(net, d.x_t, cond, d.v_star, d.sigma, d.target, f_fake, cfg.rcgm_dt,
                                       cfg.rcgm_substeps), d.regression_weight(cfg.sigma_weight_c))
    return OneStep(loss, f_fake, d.x_t - per_sample(d.sigma) * f_fake, d)


def loss_fm(net, x0, cond, generator, cfg) -> torch.Tensor:
    """L_FM: plain flow matching on short intervals, anchoring the real (positive-time) flow to data.

    Drawn by draw_fm; the target is v* = eps - x0.
    """
    d = draw_fm(x0, generator, cfg)
    return mse(net(*d.as_pass(cond)), d.v_star, sigma_weight(d.sigma, cfg.sigma_weight_c))


def loss_adv(net, x_fake, cond, generator, cfg):
    """L_adv: teach the negative-time branch the flow of the model's own one-step samples.

    Why: with F(x, s, -s) ~ the fake data's velocity and F(x, s, s) the real one, their difference
    is a fake-minus-real score the generator can descend (L_rect), with no extra network.
    x' = (1 - s) sg(x_fake) + s z, predict at sigma = s, signed target -s, regress to z - sg(x_fake).
    Returns (loss, detached prediction, x', s) for L_rect, which reuses this pass.
    """
    fake = x_fake.detach()
    sigma, z = draw_fake(fake, generator, cfg)
    x_noised = noised(fake, z, sigma)
    prediction = net(x_noised, cond, sigma, -sigma)
    return mse(prediction, z - fake, sigma_weight(sigma, cfg.sigma_weight_c)), prediction.detach(), x_noised, sigma


def loss_rect(f_fake, fake_velocity, real_velocity, clamp: float = 0.0) -> torch.Tensor:
    """L_rect: push one-step samples from the fake toward the real distribution.

    dv = F(x', s, -s) - F(x', s, s) (both without grad; the fake one comes from L_adv's pass) is a
    DMD-style fake-minus-real direction; MSE(F_fake, sg(F_fake - dv)) has gradient 2 dv / N on F_fake.
    Its value, mean(dv^2), measures the fake-real gap rather than a fit. clamp > 0 bounds each
    element of dv to [-clamp, clamp] (TwinFlow's code uses 1): while the fake branch is untrained,
    raw dv is large and noisy, and once it fits it vanishes; the clamp keeps each push bounded.
    """
    with torch.no_grad():
        dv = fake_velocity - real_velocity
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


def loss_pixel(codec, perceptual, x_fake, hr, sigma_e2e, cfg, generator, regress=None) -> dict[str, torch.Tensor]:
    """Pixel MSE (on [-1, 1] images), L1 (on [0, 1]) and perceptual distance of the decoded one-step sample.

    Why: latent consistency alone says nothing about perceived detail; these anchor the one-step
    output to the ground truth. Each sample is weighted by 1 - (1 - pixel_weight_at_noise) sigma_e2e:
    starts close to the data must reproduce it; how much a start from pure noise must is a choice
    (the precursor: not at all; super-resolution from one step at sigma = 1: fully, since that is
    the start the 1-step sampler uses). Scored on a `pixel_window` of the crop when one is set.
    `regress` [B] (Draw.regress) scales MSE and L1 per sample, never the perceptual distance.
    Returns the weighted means of the terms whose weight is > 0 (`perceptual` None: no perceptual term).
    With `checkpoint_decoder` the decoder's activations are recomputed in backward instead of kept.
    """
    rows = cols = slice(None)
    if cfg.pixel_window:
        x_fake, hr, (rows, cols) = pixel_window(x_fake, hr, cfg.pixel_window, cfg.pixel_margin, codec.scale, generator)
    decode = codec.decode
    if cfg.checkpoint_decoder and torch.is_grad_enabled():   # its activations not held beside the perceptual net's
        decode = partial(checkpoint, codec.decode, use_reentrant=False)
    with torch.profiler.record_function("teasr.decode"):     # named for the GPU suite's profile
        image = decode(x_fake).float()[..., rows, cols]
    weight = 1 - (1 - cfg.pixel_weight_at_noise) * sigma_e2e.float()
    fit = weight if regress is None else weight * regress   # the regressions' weight (Draw.regress)
    terms = {}
    if cfg.w_mse > 0:
        terms["pix_mse"] = (fit * (2 * (image - hr)).pow(2).flatten(1).mean(1)).mean()
    if cfg.w_l1 > 0:
        terms["pix_l1"] = (fit * (image - hr).abs().flatten(1).mean(1)).mean()
    if perceptual is not None:
        with torch.autocast(image.device.type, enabled=False), torch.profiler.record_function("teasr.lpips"):  # fp32
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

    Two schedules of the same step, equal to round-off (tests/test_step_schedule.py):
    - `stack_passes` / `backward_per_group` off: the terms one after the other, one total backward
      (every pass's graph alive until the end);
    - on: every random number drawn first (in the same order), then the passes without grad stacked on
      the batch dimension (the RCGM chains of L_any and L_e2e advance together, L_rect's real flow and,
      when it runs without grad, L_adv's fake flow join their first call: 5 passes in 2 calls), and each
      loss group back-propagated right after its forward, so only one pass's graph (besides the
      one-step jump's, which L_adv and L_rect still need) is alive at a time.
    """

    def __init__(self, cfg, codec, lpips):
        self.cfg, self.codec = cfg, codec
        self.lpips = lpips if cfg.w_lpips > 0 else None

    def __call__(self, net, x0, cond, hr, generator, backward):
        if self.cfg.stack_passes or self.cfg.backward_per_group:
            return self._grouped(net, x0, cond, hr, generator, backward)
        return self._sequential(net, x0, cond, hr, generator, backward)

    def _pixel(self, one_sample, hr, draw: Draw, generator):
        """The pixel terms of the one-step sample (empty when all are off); drawn last in both schedules."""
        cfg = self.cfg
        if cfg.w_mse <= 0 and cfg.w_l1 <= 0 and self.lpips is None:
            return {}
        return loss_pixel(self.codec, self.lpips, one_sample, hr, draw.sigma, cfg, generator, draw.regress)

    def weighted(self, terms: dict) -> torch.Tensor:
        return sum(getattr(self.cfg, PIXEL_WEIGHTS.get(name, f"w_{name}")) * value for name, value in terms.items())

    def _sequential(self, net, x0, cond, hr, generator, backward):
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
            terms["jump"] = mse(one.velocity, one.draw.v_star, one.draw.regression_weight(cfg.sigma_weight_c))
        if cfg.w_fm > 0:
            terms["fm"] = loss_fm(net, fm_x0, fm_cond, generator, cfg)
        if cfg.w_adv > 0 or cfg.w_rect > 0:
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.w_adv > 0):
                l_adv, fake_velocity, x_noised, sigma_fake = loss_adv(net, one.sample, cond, generator, cfg)
            if cfg.w_adv > 0:
                terms["adv"] = l_adv
            if cfg.w_rect > 0:
                with torch.no_grad():
                    real_velocity = net(x_noised, cond, sigma_fake, sigma_fake)
                terms["rect"] = loss_rect(one.velocity, fake_velocity, real_velocity, cfg.rect_clamp)
        terms.update(self._pixel(one.sample, hr, one.draw, generator))
        total = self.weighted(terms)
        backward(total)
        return total.detach(), {k: v.detach() for k, v in terms.items()}

    def _grouped(self, net, x0, cond, hr, generator, backward):
        cfg = self.cfg
        per_group = cfg.backward_per_group
        call = partial(stacked if cfg.stack_passes else one_by_one, net)
        any_part, fm_part, one_part = batch_parts(x0.shape[0], cfg)
        # every draw first, in _sequential's order, so both schedules see the same noise
        c_any, c_fm, c_one = cond[any_part], cond[fm_part], cond[one_part]
        d_any = draw_any(x0[any_part], generator, cfg) if cfg.w_any > 0 else None
        d_e2e = draw_one_step(net, x0[one_part], c_one, generator, cfg)
        d_fm = draw_fm(x0[fm_part], generator, cfg) if cfg.w_fm > 0 else None
        fake = cfg.w_adv > 0 or cfg.w_rect > 0
        sigma_fake, z = draw_fake(x0[one_part], generator, cfg) if fake else (None, None)
        hr = hr[one_part]
        terms, pending = {}, []

        def back(loss):   # per group now, or once with the rest at the end
            if per_group:
                backward(loss)
            else:
                pending.append(loss)

        # the one-step jump: its graph stays until L_adv's pass has given L_rect its fake flow
        f_fake = net(*d_e2e.as_pass(c_one))
        velocity = f_fake.detach().requires_grad_() if per_group else f_fake
        sample = d_e2e.x_t - per_sample(d_e2e.sigma) * velocity
        x_noised = noised(sample.detach(), z, sigma_fake) if fake else None

        # every pass without grad: the RCGM chains together, the real (and a no-grad fake) flow with them
        chains = [(d, c) for d, c in ((d_any, c_any), (d_e2e if cfg.w_e2e > 0 else None, c_one)) if d is not None]
        extra = [Pass(x_noised, c_one, sigma_fake, sigma_fake)] if cfg.w_rect > 0 else []
        if fake and cfg.w_adv <= 0:
            extra.append(Pass(x_noised, c_one, sigma_fake, -sigma_fake))
        displacements, flows = rcgm_displacements(call, chains, cfg.rcgm_dt, cfg.rcgm_substeps, extra)
        displacement = dict(zip([id(d) for d, _ in chains], displacements))

        one = {}
        if cfg.w_e2e > 0:
            one["e2e"] = mse(velocity, rcgm_combine(velocity, displacement[id(d_e2e)], d_e2e, cfg.rcgm_dt),
                             d_e2e.regression_weight(cfg.sigma_weight_c))
        if cfg.w_jump > 0:
            one["jump"] = mse(velocity, d_e2e.v_star, d_e2e.regression_weight(cfg.sigma_weight_c))
        one.update(self._pixel(sample, hr, d_e2e, generator))
        if one:
            back(self.weighted(one))        # frees the decoder's and LPIPS's graphs
        terms.update(one)
        if fake:
            if cfg.w_adv > 0:
                prediction = net(x_noised, c_one, sigma_fake, -sigma_fake)
                terms["adv"] = mse(prediction, z - sample.detach(), sigma_weight(sigma_fake, cfg.sigma_weight_c))
                back(cfg.w_adv * terms["adv"])
                fake_velocity = prediction.detach()
            else:
                fake_velocity = flows[-1]
            if cfg.w_rect > 0:
                terms["rect"] = loss_rect(velocity, fake_velocity, flows[0], cfg.rect_clamp)
                back(cfg.w_rect * terms["rect"])
        if per_group and velocity.grad is not None:   # the jump's own backward, with every term's gradient
            torch.autograd.backward(f_fake, velocity.grad)
        if d_any is not None:
            prediction = net(*d_any.as_pass(c_any))
            terms["any"] = mse(prediction, rcgm_combine(prediction, displacement[id(d_any)], d_any, cfg.rcgm_dt),
                               sigma_weight(d_any.sigma, cfg.sigma_weight_c))
            back(cfg.w_any * terms["any"])
        if d_fm is not None:
            terms["fm"] = mse(net(*d_fm.as_pass(c_fm)), d_fm.v_star, sigma_weight(d_fm.sigma, cfg.sigma_weight_c))
            back(cfg.w_fm * terms["fm"])
        if pending:
            backward(sum(pending))
        terms = {k: v.detach() for k, v in terms.items()}
        return self.weighted(terms), terms

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
