"""The object on a TEASR_MODEL wire, the Codec adapter for ComfyUI VAEs, and the memory model.

Memory model (bytes of activations for one forward over a window of the output):
  tokens = 2 * (h / a) * (w / a) + context tokens     (noise + condition branch; a = codec scale x patch)
  bytes  = cost_per_token * tokens + cost_per_pair * tokens^2
On CUDA both costs are MEASURED once per loaded model with two probe forwards (peak allocation
above the baseline, fitted through the origin); on other devices the estimate is analytic,
cost_per_token = dtype bytes x width x (16 + 3 x mlp_ratio) and cost_per_pair = 0: the live
activations of one block, checked on CPU (torch 2.13, small preset, fp32) where the measured peak
RSS was 23-27 KB per token and flat in the token count (SDPA's CPU kernel is memory-efficient).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
from comfy.model_patcher import ModelPatcher

from ..teasr_core.codecs.codec import check_image
from ..teasr_core.codecs.qwen_vae import check_same_vae, fingerprint
from ..teasr_core.network.model import DualBranchDiT
from ..teasr_core.sampling import ModelSampling
from ..teasr_core.upscale.pipeline import Upscaler

# Share of the free memory (after the weights are loaded) a window may use: VRAM is ours for the
# duration of the node; host RAM is shared with ComfyUI's caches and everything else.
BUDGET_SHARE = {"cuda": 0.8}
DEFAULT_BUDGET_SHARE = 0.5
PROBE_SIDES = (16, 32)   # latent tokens per side of the two probe windows
TEXT_TOKENS = 512        # context length assumed for models with a text stream (prompts are shorter)


@dataclass(eq=False)
class TEASRModel:
    """A TEASR DiT under ComfyUI memory management (ModelPatcher), its codec and checkpoint metadata."""

    patcher: ModelPatcher
    codec: object           # teasr_core.codecs.Codec
    meta: dict
    name: str
    sampling: ModelSampling = ModelSampling()  # how the checkpoint is best sampled (TEASRCheckpoint.sampling)
    _cost: tuple[float, float] | None = field(default=None, repr=False)

    @property
    def dit(self) -> DualBranchDiT:
        return self.patcher.model

    @property
    def context_dim(self) -> int | None:
        return self.dit.cfg.context_dim

    @property
    def alignment(self) -> int:
        return self.codec.scale * self.dit.cfg.patch

    def load(self, window_hw: tuple[int, int]) -> Upscaler:
        """Put the weights on the compute device, asking ComfyUI to make room for one window's activations.

        Full load: TEASR's layers are plain torch modules, not comfy.ops casting layers, so they
        cannot run partially offloaded.
        """
        if self._cost is None:
            mm.load_models_gpu([self.patcher], force_full_load=True)
            self._cost = self._token_cost()
        mm.load_models_gpu([self.patcher], memory_required=self.window_bytes(*window_hw), force_full_load=True)
        return Upscaler(self.dit, self.codec, sampling=self.sampling)

    def tokens(self, out_h: int, out_w: int) -> int:
        a = self.alignment
        context = self.dit.cfg.null_context_tokens if self.context_dim is None else TEXT_TOKENS
        return 2 * -(-out_h // a) * -(-out_w // a) + context

    def window_bytes(self, out_h: int, out_w: int) -> int:
        """Activation bytes of one forward over an out_h x out_w output window (after `load`)."""
        per_token, per_pair = self._cost
        n = self.tokens(out_h, out_w)
        return int(per_token * n + per_pair * n * n)

    def activation_budget(self) -> int:
        device = self.patcher.load_device
        return int(mm.get_free_memory(device) * BUDGET_SHARE.get(device.type, DEFAULT_BUDGET_SHARE))

    def _token_cost(self) -> tuple[float, float]:
        cfg, device = self.dit.cfg, self.patcher.load_device
        if device.type == "cuda":
            return measure_token_cost(self.dit, device)
        element = torch.empty((), dtype=self.dit.compute_dtype).element_size()
        return element * cfg.width * (16 + 3 * cfg.mlp_ratio), 0.0


@torch.no_grad()
def measure_token_cost(dit: DualBranchDiT, device: torch.device) -> tuple[float, float]:
    """(bytes per token, bytes per token pair) from the peak CUDA allocation of two probe forwards."""
    cfg, dtype, points = dit.cfg, dit.compute_dtype, []
    for side in PROBE_SIDES:
        latent = torch.randn(1, cfg.in_channels, side * cfg.patch, side * cfg.patch, device=device, dtype=dtype)
        context = None if cfg.context_dim is None else torch.zeros(1, TEXT_TOKENS, cfg.context_dim, device=device, dtype=dtype)
        sigma = torch.ones(1, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        dit(latent, latent, sigma, sigma * 0, context)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        tokens = 2 * side * side + (cfg.null_context_tokens if context is None else TEXT_TOKENS)
        points.append((tokens, float(peak)))
        del latent, context
    (n1, p1), (n2, p2) = points
    per_pair = max(0.0, (p2 / n2 - p1 / n1) / (n2 - n1))
    per_token = max(p / n - per_pair * n for n, p in points)
    return per_token, per_pair


class ComfyVAECodec:
    """teasr's Codec on a ComfyUI VAE, for checkpoints trained in an external VAE's latent space.

    The VAE's raw latents are normalised with the checkpoint's latent_mean / latent_std. Images are
    encoded one by one: video VAEs (Qwen-Image's is Wan's) would read a batch as frames.
    Large images reach it as overlapping tiles blended with feathered weights (teasr_core.codecs
    tiled_encode / tiled_decode), the pattern of ComfyUI's own tiled VAE calls and with their
    overlap; per tile, ComfyUI's VAE.encode / decode load the VAE and fall back to its tiled
    variants on out-of-memory.
    """

    tile_margin, tile_overlap = 0, 16   # latent px; decode_tiled's default overlap for 2-D VAEs

    def __init__(self, vae, config: dict, expected_channels: int):
        self.vae = vae
        self.name = config.get("vae") or config.get("name", "external")
        self.scale = int(vae.spacial_compression_encode())
        self.channels = int(vae.latent_channels)
        if self.channels != expected_channels:
            raise ValueError(f"the connected VAE makes {self.channels}-channel latents, but this TEASR model "
                             f"was trained on {expected_channels}-channel latents of {self.name!r}; connect that VAE")
        if config.get("fingerprint"):
            check_same_vae(config, fingerprint(vae.get_sd()), "connected to TEASR Loader")
        self.mean = torch.tensor(config.get("latent_mean") or [0.0] * self.channels).reshape(1, -1, 1, 1)
        self.std = torch.tensor(config.get("latent_std") or [1.0] * self.channels).reshape(1, -1, 1, 1)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image, self.scale)
        latents = []
        for one in image.split(1):
            raw = self.vae.encode(one.movedim(1, -1).float())
            latents.append(raw.reshape(1, self.channels, *raw.shape[-2:]))   # drop a video VAE's frame axis
        return ((torch.cat(latents).float().cpu() - self.mean) / self.std).to(image.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raw = latent.float().cpu() * self.std + self.mean
        frame = (lambda z: z[:, :, None]) if getattr(self.vae, "latent_dim", 2) == 3 else (lambda z: z)
        images = [self.vae.decode(frame(one)) for one in raw.split(1)]
        return torch.cat([im.reshape(-1, *im.shape[-3:])[:1] for im in images]).movedim(-1, 1).to(latent.device)
