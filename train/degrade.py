"""Online Real-ESRGAN second-order degradation (Wang et al. 2021), batched in torch on any device.

HR [B, 3, H, W] in [0, 1] -> LR [B, 3, H/scale, W/scale] on 8-bit levels. The steps and defaults
follow BasicSR's `RealESRGANDataset` (kernel sampling) and `RealESRGANModel.feed_data` (everything
else) with the values of `train_realesrgan_x4plus.yml`, which OSEDiff / PiSA-SR reuse. Deliberate
differences:

- Every sample draws its own parameters: blur kernel, second-blur on/off, resize modes, noise type,
  strength and gray/colour, JPEG qualities, final sinc and the order of the final steps. Only the
  two intermediate resize scales are shared by the batch (as in Real-ESRGAN) because they set the
  tensor shape; each sample's marginal distribution is the same either way.
- JPEG is kornia's differentiable codec (Reich et al. 2024: 4:2:0, standard tables, libjpeg's
  quality scaling, polynomial rounding). Like Real-ESRGAN's DiffJPEG it approximates libjpeg; it is
  not byte-exact.
- Gray Gaussian noise is drawn per sample (BasicSR shares one gray noise field across the batch).
- No USM sharpening of the HR target; diffusion-SR recipes train on the plain HR.

Randomness: every decision and parameter comes from the caller's CPU `torch.Generator`, so it does
not depend on the device; pixel noise is drawn on the image's device from a generator seeded from
it. Same generator state, input and device -> bit-identical LR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import jpeg_codec_differentiable

# Order of `kernel_prob`, as in Real-ESRGAN's `kernel_list`.
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")

Range = tuple[float, float]


@dataclass
class DegradationConfig:
    """Real-ESRGAN x4plus degradation settings; names follow its yml (suffix 2 = second stage)."""

    scale: int = 4
    kernel_range: tuple[int, int] = (7, 21)  # odd kernel sizes drawn uniformly from this range
    # stage 1
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: Range = (0.2, 3.0)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: Range = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Range = (1.0, 30.0)  # sigma on the 0..255 scale
    poisson_scale_range: Range = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Range = (30.0, 95.0)
    # stage 2
    second_blur_prob: float = 0.8
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: Range = (0.2, 1.5)
    betag_range2: Range = (0.5, 4.0)
    betap_range2: Range = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: Range = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Range = (1.0, 25.0)
    poisson_scale_range2: Range = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Range = (30.0, 95.0)
    # final: [resize to LR size + sinc] and JPEG, in random order
    final_sinc_prob: float = 0.8

    def __post_init__(self):
        """Catch TOML typos here rather than as odd images hours into a run."""
        low, high = self.kernel_range
        if low % 2 == 0 or high % 2 == 0 or not 1 <= low <= high:
            raise ValueError(f"kernel_range must be two odd sizes low <= high, got {self.kernel_range}")
        for name in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
            probs = getattr(self, name)
            expected = len(KERNEL_TYPES) if name.startswith("kernel") else 3
            if len(probs) != expected or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(f"{name} needs {expected} probabilities summing to 1, got {probs}")


def _uniform(n: int, value_range: Range, generator: torch.Generator) -> torch.Tensor:
    low, high = value_range
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _bernoulli(n: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < prob


def _odd_sizes(n: int, kernel_range: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    low, high = kernel_range
    return low + 2 * torch.randint((high - low) // 2 + 1, (n,), generator=generator)


def _shape_beta(n: int, beta_range: Range, generator: torch.Generator) -> torch.Tensor:
    """BasicSR draws beta from [low, 1] or [1, high] with equal odds (so plateau [1, 2] gives 1 half the time)."""
    low, high = beta_range
    below_one = _bernoulli(n, 0.5, generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.where(below_one, low + (1 - low) * u, 1 + (high - 1) * u)


def _centred_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _normalise_within(kernels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zero outside each sample's size x size centre, then sum to 1: the same as making a size x size
    kernel and zero-padding it to the stack's K x K, which lets one stack hold every size.

    Weights below 1e-12 of the peak are zeroed too: in float32 they become denormals, which slow a
    CPU convolution about tenfold, and they are far below one 8-bit level.
    """
    x, y = _centred_grid(kernels.shape[-1])
    half = (sizes // 2).view(-1, 1, 1)
    kernels = kernels * ((x.abs() <= half) & (y.abs() <= half))
    peak = kernels.abs().amax(dim=(-2, -1), keepdim=True)
    kernels = torch.where(kernels.abs() < 1e-12 * peak, torch.zeros_like(kernels), kernels)
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def gaussian_family_kernels(sizes: torch.Tensor, types: torch.Tensor, sigma_x: torch.Tensor,
                            sigma_y: torch.Tensor, theta: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Real-ESRGAN's six blur kernels, one per sample: [n, K, K] float64, K = max(sizes).

    types index KERNEL_TYPES. With the rotated quadratic form Q = x^T Sigma^-1 x:
    gaussian exp(-Q/2), generalized exp(-Q^beta/2), plateau 1/(Q^beta + 1). Isotropic types ignore
    sigma_y and theta.
    """
    x, y = _centred_grid(int(sizes.max()))
    isotropic = types % 2 == 0
    family = types // 2  # 0 gaussian, 1 generalized, 2 plateau
    sigma_y = torch.where(isotropic, sigma_x, sigma_y).view(-1, 1, 1)
    theta = torch.where(isotropic, torch.zeros_like(theta), theta).view(-1, 1, 1)
    cos, sin = theta.cos(), theta.sin()
    along = cos * x + sin * y
    across = -sin * x + cos * y
    quadratic = (along / sigma_x.view(-1, 1, 1)) ** 2 + (across / sigma_y) ** 2
    quadratic = quadratic ** torch.where(family == 0, torch.ones_like(beta), beta).view(-1, 1, 1)
    kernels = torch.where((family == 2).view(-1, 1, 1), 1 / (quadratic + 1), torch.exp(-0.5 * quadratic))
    return _normalise_within(kernels, sizes)


def sinc_kernels(sizes: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Circular low-pass (2-D sinc / jinc) kernels with cutoff omega: [n, K, K] float64.

    They model ringing and overshoot; BasicSR's `circular_lowpass_kernel`.
    """
    x, y = _centred_grid(int(sizes.max()))
    radius = torch.hypot(x, y)
    omega = omega.view(-1, 1, 1)
    safe_radius = torch.where(radius == 0, torch.ones_like(radius), radius)
    kernels = torch.where(radius == 0, omega ** 2 / (4 * math.pi),
                          omega * torch.special.bessel_j1(omega * safe_radius) / (2 * math.pi * safe_radius))
    return _normalise_within(kernels, sizes)


def sample_blur_kernels(n: int, generator: torch.Generator, *, kernel_prob, sinc_prob: float, blur_sigma: Range,
                        betag_range: Range, betap_range: Range, kernel_range: tuple[int, int],
                        blur_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample kernels as `RealESRGANDataset` draws them: (kernels [n, K, K], sizes [n]).

    A sample left unblurred (probability 1 - blur_prob) gets size 1, i.e. the identity.
    """
    sizes = _odd_sizes(n, kernel_range, generator)
    types = torch.multinomial(torch.tensor(kernel_prob, dtype=torch.float64), n, replacement=True,
                              generator=generator)
    sigma_x = _uniform(n, blur_sigma, generator)
    sigma_y = _uniform(n, blur_sigma, generator)
    theta = _uniform(n, (-math.pi, math.pi), generator)
    beta = torch.where(types // 2 == 2, _shape_beta(n, betap_range, generator), _shape_beta(n, betag_range, generator))
    use_sinc = _bernoulli(n, sinc_prob, generator)
    # Real-ESRGAN allows lower cutoffs (stronger ringing) only on kernels big enough to show them.
    lowest_cutoff = torch.where(sizes < 13, math.pi / 3, math.pi / 5)
    omega = lowest_cutoff + (math.pi - lowest_cutoff) * torch.rand(n, generator=generator, dtype=torch.float64)
    sizes = torch.where(_bernoulli(n, blur_prob, generator), sizes, torch.ones_like(sizes))
    kernels = torch.where(use_sinc.view(-1, 1, 1), sinc_kernels(sizes, omega),
                          gaussian_family_kernels(sizes, types, sigma_x, sigma_y, theta, beta))
    return kernels, sizes


def sample_final_sinc_kernels(n: int, generator: torch.Generator, *, prob: float,
                              kernel_range: tuple[int, int]) -> torch.Tensor:
    """The last sinc filter: with probability prob a sinc with cutoff in [pi/3, pi], else the identity."""
    sizes = _odd_sizes(n, kernel_range, generator)
    omega = _uniform(n, (math.pi / 3, math.pi), generator)
    sizes = torch.where(_bernoulli(n, prob, generator), sizes, torch.ones_like(sizes))
    return sinc_kernels(sizes, omega)


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Correlate each image with its own kernel (grouped conv, reflect padding, like BasicSR's filter2D).

    Images smaller than the padding (tiny crops after a strong downscale) fall back to replicate padding.
    """
    b, c, h, w = images.shape
    size = kernels.shape[-1]
    if size == 1:  # every kernel is the identity
        return images
    pad = size // 2
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")
    weight = kernels.to(images).repeat_interleave(c, dim=0).unsqueeze(1)
    out = F.conv2d(padded.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)
    return out.view(b, c, h, w)


def resize(images: torch.Tensor, size: tuple[int, int], modes: torch.Tensor) -> torch.Tensor:
    """Resize each sample with its own mode (index into RESIZE_MODES), without antialiasing like Real-ESRGAN."""
    if tuple(images.shape[-2:]) == size:
        return images
    out = images.new_empty(*images.shape[:2], *size)
    for index, mode in enumerate(RESIZE_MODES):
        members = (modes == index).nonzero().flatten().to(images.device)
        if len(members):
            align = None if mode == "area" else False
            out[members] = F.interpolate(images[members], size=size, mode=mode, align_corners=align)
    return out


def _sample_resize_scale(generator: torch.Generator, probs, value_range: Range) -> float:
    """One scale for the batch: up in [1, high], down in [low, 1] or keep, with probabilities probs."""
    direction = int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator))
    u = float(torch.rand(1, generator=generator, dtype=torch.float64))
    low, high = value_range
    return (1 + (high - 1) * u, low + (1 - low) * u, 1.0)[direction]


def _sample_modes(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(len(RESIZE_MODES), (n,), generator=generator)


def _poisson_noise(images: torch.Tensor, noise_generator: torch.Generator) -> torch.Tensor:
    """BasicSR's Poisson noise: photon count per level = 2^ceil(log2(number of 8-bit levels used))."""
    levels = (images * 255).round().clamp(0, 255)
    used = torch.zeros(len(images), 256, device=images.device)
    used.scatter_(1, levels.flatten(1).long(), 1.0)
    photons = torch.exp2(torch.ceil(torch.log2(used.sum(1)))).view(-1, 1, 1, 1)
    clean = levels / 255
    return torch.poisson(clean * photons, generator=noise_generator) / photons - clean


def add_noise(images: torch.Tensor, generator: torch.Generator, noise_generator: torch.Generator, *,
              gaussian_prob: float, sigma_range: Range, poisson_scale_range: Range, gray_prob: float) -> torch.Tensor:
    """Per sample: Gaussian (sigma on the 0..255 scale) or Poisson noise, gray or colour; clamped to [0, 1]."""
    n, _, h, w = images.shape
    gaussian = _bernoulli(n, gaussian_prob, generator)
    gray = _bernoulli(n, gray_prob, generator)
    sigma = _uniform(n, sigma_range, generator) / 255
    poisson_scale = _uniform(n, poisson_scale_range, generator)
    noise = torch.zeros_like(images)
    for is_gaussian in (True, False):
        for is_gray in (True, False):
            chosen = ((gaussian == is_gaussian) & (gray == is_gray)).nonzero().flatten()
            if not len(chosen):
                continue
            members = chosen.to(images.device)
            if is_gaussian:
                channels = 1 if is_gray else 3
                field = torch.randn(len(chosen), channels, h, w, generator=noise_generator, device=images.device)
                strength = sigma[chosen]
            else:
                source = images[members]
                field = _poisson_noise(rgb_to_grayscale(source) if is_gray else source, noise_generator)
                strength = poisson_scale[chosen]
            noise[members] = field * strength.to(images).view(-1, 1, 1, 1)  # gray fields broadcast to RGB
    return (images + noise).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """kornia's differentiable JPEG with a per-sample quality, clamped on both sides like DiffJPEG."""
    return jpeg_codec_differentiable(images.clamp(0, 1), quality.to(images)).clamp(0, 1)


def _final_steps(images: torch.Tensor, lr_size: tuple[int, int], generator: torch.Generator,
                 config: DegradationConfig) -> torch.Tensor:
    """[resize to LR size + sinc] and JPEG, in an order drawn per sample."""
    n = len(images)
    sinc = sample_final_sinc_kernels(n, generator, prob=config.final_sinc_prob, kernel_range=config.kernel_range)
    quality = _uniform(n, config.jpeg_range2, generator)
    modes = _sample_modes(n, generator)
    resize_first = _bernoulli(n, 0.5, generator)
    out = images.new_empty(n, images.shape[1], *lr_size)
    for first in (True, False):
        chosen = (resize_first == first).nonzero().flatten()
        if not len(chosen):
            continue
        members = chosen.to(images.device)
        x = images[members]
        if not first:
            x = jpeg(x, quality[chosen])
        x = filter2d(resize(x, lr_size, modes[chosen]), sinc[chosen])
        if first:
            x = jpeg(x, quality[chosen])
        out[members] = x
    return out


@torch.no_grad()
def degrade(hr: torch.Tensor, generator: torch.Generator, config: DegradationConfig | None = None) -> torch.Tensor:
    """HR [B, 3, H, W] in [0, 1] (H, W multiples of config.scale) -> LR [B, 3, H/scale, W/scale] float32 in [0, 1],
    rounded to 8-bit levels as Real-ESRGAN's LR is. generator must be a CPU generator; it advances."""
    config = config or DegradationConfig()
    b, _, h, w = hr.shape
    if h % config.scale or w % config.scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {config.scale}")
    noise_generator = torch.Generator(hr.device)
    noise_generator.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
    x = hr.float()

    kernels, _ = sample_blur_kernels(b, generator, kernel_prob=config.kernel_prob, sinc_prob=config.sinc_prob,
                                     blur_sigma=config.blur_sigma, betag_range=config.betag_range,
                                     betap_range=config.betap_range, kernel_range=config.kernel_range)
    x = filter2d(x, kernels)
    scale = _sample_resize_scale(generator, config.resize_prob, config.resize_range)
    x = resize(x, (max(1, int(h * scale)), max(1, int(w * scale))), _sample_modes(b, generator))
    x = add_noise(x, generator, noise_generator, gaussian_prob=config.gaussian_noise_prob,
                  sigma_range=config.noise_range, poisson_scale_range=config.poisson_scale_range,
                  gray_prob=config.gray_noise_prob)
    x = jpeg(x, _uniform(b, config.jpeg_range, generator))

    kernels, _ = sample_blur_kernels(b, generator, kernel_prob=config.kernel_prob2, sinc_prob=config.sinc_prob2,
                                     blur_sigma=config.blur_sigma2, betag_range=config.betag_range2,
                                     betap_range=config.betap_range2, kernel_range=config.kernel_range,
                                     blur_prob=config.second_blur_prob)
    x = filter2d(x, kernels)
    lr_h, lr_w = h // config.scale, w // config.scale
    scale = _sample_resize_scale(generator, config.resize_prob2, config.resize_range2)
    x = resize(x, (max(1, int(lr_h * scale)), max(1, int(lr_w * scale))), _sample_modes(b, generator))
    x = add_noise(x, generator, noise_generator, gaussian_prob=config.gaussian_noise_prob2,
                  sigma_range=config.noise_range2, poisson_scale_range=config.poisson_scale_range2,
                  gray_prob=config.gray_noise_prob2)

    x = _final_steps(x, (lr_h, lr_w), generator, config)
    return (x * 255).round().clamp(0, 255) / 255
