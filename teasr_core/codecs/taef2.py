"""TAEF2: the tiny autoencoder for FLUX.2-space latents (32 channels, 1/8 resolution) used as a codec.

The network is written here from the layer layout in `shared/weights/README.md`; the weights are
madebyollin's `taef2_encoder` / `taef2_decoder` (github.com/madebyollin/taesd, MIT), stored as fp16
safetensors and shipped in `bundled/taef2/` with their licence (the default model works in this space). It gives the model a 64x smaller space than pixels at ~36 dB round-trip PSNR, with a
decoder cheap enough to back-propagate pixel losses through during training.

Large images are encoded / decoded in tiles. The nets are local (3x3 convolutions) except for the
GroupNorms of the mid blocks, whose statistics span the whole input: per-tile statistics shift each
tile's output (7-10/255 mean error on a 1024x672 photo in 256-px tiles). So the tiled paths first
measure those statistics over the whole image, tile by tile (cheap: the mid blocks run at latent
resolution), then run every tile with them; with a margin covering the receptive field the tiles
then match the untiled result (measured in tests/test_tiled_pipeline.py).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..tiling import Rows, RunningMoments, gather
from .codec import check_image, tiled_map

BUNDLED_WEIGHTS = Path(__file__).resolve().parents[1] / "bundled" / "taef2"
WEIGHT_FILES = ("taef2_encoder.safetensors", "taef2_decoder.safetensors")
LR_HEAD_FILE = "taef2_lr_head_x4.safetensors"   # optional: the LR head (make_lr_head), TEASR's own

# Per-channel mean / std of raw TAEF2 latents of real photos, used to normalise them to ~N(0, 1).
# Measured once (fp32, CPU) over 40 images of shared/data/train_pool (every 12th file of the 480,
# sorted by "subfolder/name" across bsds500_test, bsds500_train, sun_hays80), 4 random 256x256 crops
# each (one torch.Generator seeded 0, per crop top = randint(0, H - 255) then left = randint(0, W - 255);
# RGB in [0, 1]), i.e. 160 crops -> 160 * 32 * 32 latent pixels per channel; population mean / std
# pooled over all of them in float64. Raw values seen: -5.6..5.8.
LATENT_MEAN = (
     0.0065, -0.0063, -0.1079,  0.0103,  0.0842,  0.1330, -0.0319,  0.0050,
     0.0252, -0.0368,  0.0784, -0.0309,  0.0653,  0.0502,  0.1535,  0.0841,
     0.0705,  0.1736, -0.0618, -0.0373,  0.0055,  0.0879, -0.0118, -0.0965,
     0.1477, -0.0328,  0.0731,  0.0367,  0.1597,  0.1793,  0.0287,  0.0037,
)
LATENT_STD = (
     0.7338,  1.0202,  0.9545,  0.9216,  0.7232,  0.9742,  0.9027,  0.8156,
     0.9107,  0.6260,  0.6603,  1.0130,  0.7309,  0.6682,  0.9101,  0.9630,
     0.7696,  0.6716,  0.7376,  1.0093,  0.7364,  0.6858,  0.7849,  0.6860,
     0.9610,  0.7481,  0.9727,  0.8468,  0.7979,  0.9706,  0.7752,  0.9702,
)


class Float32Conv(nn.Module):
    """A convolution kept in float32 inside a half-precision net: the image-side and latent-side ends.

    Why: in bf16 the decoder's last layer would round pixels to steps of 1/256 in [0.5, 1) and the
    encoder's last its latents to 3 significant digits; these two thin layers cost ~1 % of the net.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float())


class Clamp(nn.Module):
    """Soft clamp 3 * tanh(x / 3): keeps out-of-range latents from blowing up the decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that can normalise with given statistics (the whole image's) instead of its input's."""

    statistics: tuple[torch.Tensor, torch.Tensor] | None = None   # (mean, var), each [B, groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is None:
            return super().forward(x)
        mean, var = (s.repeat_interleave(self.num_channels // self.num_groups, 1)[..., None, None]
                     for s in self.statistics)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return ((x - mean) * scale + self.bias[:, None, None]).to(x.dtype)


def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """Residual block relu(conv-relu-conv-relu-conv(x) + x) on 64 channels.

    `mid` blocks (at 1/8 resolution) first add a 1x1 bottleneck with GroupNorm, x = x + pool(x),
    which gives the lowest level some normalised, channel-mixing capacity.
    """

    def __init__(self, channels: int = 64, mid: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(channels, channels), nn.ReLU(inplace=True),
                                  conv3x3(channels, channels), nn.ReLU(inplace=True),
                                  conv3x3(channels, channels))
        self.pool = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1, bias=False),
                                  GroupNorm(4, 4 * channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(4 * channels, channels, 1, bias=False)) if mid else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.conv(x).add_(x).relu_()


ENCODER_HEAD = 11    # encoder layers 0-10 run at image resolution and are local; 11-14 (mid blocks) at 1/8
DECODER_HEAD = 3     # decoder layers 0-2 precede the mid blocks 3-5 (at 1/8); the rest upsamples, local
# Latent pixels of context around each tile: covers the local parts' receptive fields (encoder head
# ~65 image px, encoder tail 10 latent px, the decoder ~18 latent px of which the outer ones weigh
# almost nothing: 8 gave at most 4/255 difference to an untiled decode, 16 gave 0.02/255).
TILE_MARGIN = 8


def make_encoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    """[B, 3, H, W] in [0, 1] -> raw latent [B, 32, H/8, W/8]. Indices match the weight keys."""
    return nn.Sequential(
        conv3x3(3, width), Block(width),                                                   # 0-1
        conv3x3(width, width, stride=2, bias=False), Block(width), Block(width), Block(width),  # 2-5
        conv3x3(width, width, stride=2, bias=False), Block(width), Block(width), Block(width),  # 6-9
        conv3x3(width, width, stride=2, bias=False),                                       # 10
        Block(width, mid=True), Block(width, mid=True), Block(width, mid=True),             # 11-13
        conv3x3(width, latent_channels),                                                   # 14
    )


LR_HEAD_REPLACES = 7  # encoder layers 0-6 (image resolution down to 1/4) that the LR head stands in for
LR_SCALE = 4          # the upscale factor the LR head is made for: its input is the LR image itself


def make_lr_head(width: int = 64) -> nn.Sequential:
    """LR image [B, 3, h, w] -> the features encoder[:7] gives for its x4 bicubic upscale, [B, 64, h, w].

    Why: the model's condition is the encoded bicubic upscale, and the encoder's first layers run at
    output resolution, 16x the LR's pixels, for an image whose extra pixels are interpolated. This
    head is trained (train/condition_encoder.py) to give the same features from the LR directly;
    encoder layers 7-14 follow unchanged. ~260 k parameters, ~1/10 of the encode's work.
    """
    return nn.Sequential(conv3x3(3, width), Block(width), Block(width), conv3x3(width, width))


def make_decoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    """Raw latent [B, 32, h, w] -> image [B, 3, 8h, 8w], roughly in [0, 1] (not clamped)."""
    return nn.Sequential(
        Clamp(), conv3x3(latent_channels, width), nn.ReLU(inplace=True),                    # 0-2
        Block(width, mid=True), Block(width, mid=True), Block(width, mid=True),             # 3-5
        nn.Upsample(scale_factor=2), conv3x3(width, width, bias=False),                     # 6-7
        Block(width), Block(width), Block(width),                                          # 8-10
        nn.Upsample(scale_factor=2), conv3x3(width, width, bias=False),                     # 11-12
        Block(width), Block(width), Block(width),                                          # 13-15
        nn.Upsample(scale_factor=2), conv3x3(width, width, bias=False),                     # 16-17
        Block(width), conv3x3(width, 3),                                                   # 18-19
    )


def default_weights_dir() -> Path:
    """$TEASR_TAEF2_DIR, else the copy that ships with the pack."""
    env = os.environ.get("TEASR_TAEF2_DIR")
    return Path(env) if env else BUNDLED_WEIGHTS


def load_strict(net: nn.Module, path: Path) -> None:
    """Load a safetensors file into `net`, naming any missing / unexpected keys; fp16 -> fp32 on CPU."""
    load_state(net, load_file(str(path), device="cpu"), str(path))


def load_state(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors into `net` as float32, or ValueError naming the missing / unexpected keys of `source`."""
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the TAEF2 layout: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


class TAEF2Codec:
    """Frozen TAEF2 encoder/decoder with per-channel latent normalisation (see `Codec` in codec.py).

    `decoder_state`: a decoder fine-tuned for one model (train/decoder_finetune.py), which its
    checkpoint carries; TAEF2's own otherwise. With the LR head in the weights folder, `encode_lr`
    gives the condition of a x4 upscale from the LR image itself (see make_lr_head); `lr_scale` is
    then 4, else None.

    Inputs are moved to the codec's device and dtype; latents and images come out on that device in
    float32 (a bf16 / fp16 codec keeps its first and last layers in float32). The nets have no trainable
    parameters, but `decode` is an ordinary differentiable function of its input. They run in
    channels-last layout: 1.3-1.5x faster convolutions on CPU (oneDNN), the same values to 1e-5.
    ReLUs and residual adds work in place on fresh convolution outputs (autograd-safe: no
    convolution needs its output back): at 1024² each saved copy is a 256 MiB tensor.
    """

    name = "taef2"
    channels = 32
    scale = 8
    tile_margin, tile_overlap = TILE_MARGIN, 0

    def __init__(self, weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, latent_mean=None, latent_std=None,
                 decoder_state: dict[str, torch.Tensor] | None = None):
        weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        paths = [weights_dir / f for f in WEIGHT_FILES]
        absent = [p.name for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"TAEF2 weights not found: {', '.join(absent)} missing in {weights_dir}. Put "
                f"taef2_encoder.safetensors and taef2_decoder.safetensors there (or point TEASR_TAEF2_DIR "
                f"/ weights_dir at their folder); they are the taef2 weights of "
                f"github.com/madebyollin/taesd (MIT), converted to safetensors.")
        self.device, self.dtype = torch.device(device), dtype
        self.encoder, self.decoder = make_encoder(self.channels), make_decoder(self.channels)
        for net, path in zip((self.encoder, self.decoder), paths):
            if net is self.decoder and decoder_state is not None:   # a model's own fine-tuned decoder
                load_state(net, decoder_state, "the checkpoint's decoder (codec.decoder.*)")
            else:
                load_strict(net, path)
            net.requires_grad_(False).eval().to(self.device, dtype, memory_format=torch.channels_last)
            if dtype != torch.float32:
                net[-1] = Float32Conv(net[-1])
        self.lr_head, self.lr_scale = None, None
        if (weights_dir / LR_HEAD_FILE).is_file():
            self.lr_head, self.lr_scale = make_lr_head(), LR_SCALE
            load_strict(self.lr_head, weights_dir / LR_HEAD_FILE)
            self.lr_head.requires_grad_(False).eval().to(self.device, dtype, memory_format=torch.channels_last)
        mean = LATENT_MEAN if latent_mean is None else latent_mean
        std = LATENT_STD if latent_std is None else latent_std
        self.latent_mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.latent_std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        if self.latent_mean.shape[1] != self.channels or self.latent_std.shape[1] != self.channels:
            raise ValueError(f"latent_mean / latent_std need {self.channels} values each, got "
                             f"{self.latent_mean.shape[1]} / {self.latent_std.shape[1]}")

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] (H, W multiples of 8) -> normalised latent [B, 32, H/8, W/8]."""
        check_image(image, self.scale)
        raw = self.encoder(self._input(image))
        return self._normalised(raw)

    def encode_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """LR [B, 3, h, w] in [0, 1] (h, w even) -> about `encode` of its x4 bicubic upscale, [B, 32, h/2, w/2]."""
        check_image(lr, self.scale // LR_SCALE)
        raw = self.encoder[LR_HEAD_REPLACES:](self._lr_head()(self._input(lr)))
        return self._normalised(raw)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, 32, h, w] -> image [B, 3, 8h, 8w] clamped to [0, 1].

        The hard clamp passes no gradient through pixels the decoder puts outside [0, 1]; those
        are rare and small overshoots, and the codec contract is an image in [0, 1].
        """
        return self.decode_unclamped(latent).clamp(0, 1).contiguous()

    def decode_unclamped(self, latent: torch.Tensor, decoder: nn.Module | None = None) -> torch.Tensor:
        """`decode` before the clamp, through `decoder` (TAEF2's architecture) instead of the codec's own when given:
        a decoder being fine-tuned (train.decoder_finetune) needs gradients where its pixels overshoot [0, 1]."""
        return (self.decoder if decoder is None else decoder)(self._raw(latent))

    def encode_tiled(self, image_window: Callable[[int, int, int, int], torch.Tensor], latent_hw: tuple[int, int],
                     tile: int) -> torch.Tensor:
        """`encode` of the image given by `image_window(y0, y1, x0, x1)` (pixels), tile by tile (tile in latent px).

        The image-resolution head runs once per tile into a 64-channel map at 1/8 resolution; the
        mid blocks' statistics are measured on that whole map, then the tail runs per tile with them.
        """
        return self._encode_tiled(self.encoder[:ENCODER_HEAD], image_window, self.scale, latent_hw, tile)

    def encode_lr_tiled(self, lr_window: Callable[[int, int, int, int], torch.Tensor], latent_hw: tuple[int, int],
                        tile: int) -> torch.Tensor:
        """`encode_lr` of the LR image given by `lr_window(y0, y1, x0, x1)` (LR pixels), tiled as `encode_tiled`."""
        head = nn.Sequential(self._lr_head(), *self.encoder[LR_HEAD_REPLACES:ENCODER_HEAD])
        return self._encode_tiled(head, lr_window, self.scale // LR_SCALE, latent_hw, tile)

    def _encode_tiled(self, head: nn.Module, image_window: Callable[[int, int, int, int], torch.Tensor], s: int,
                      latent_hw: tuple[int, int], tile: int) -> torch.Tensor:
        """The local `head` per tile (s input pixels per latent pixel), then the mid blocks with whole-image statistics."""
        tail = self.encoder[ENCODER_HEAD:]
        features = gather(tiled_map(
            lambda t: head(self._input(image_window(t.y0 * s, (t.y0 + t.h) * s, t.x0 * s, (t.x0 + t.w) * s))),
            latent_hw, tile, self.tile_margin, 0, 1)).to(self.dtype)   # tiles are blended in float32
        with self._global_norms(list(tail[:3]), nn.Identity(), features, tile):
            raw = gather(tiled_map(lambda t: tail(_window(features, t)), latent_hw, tile, self.tile_margin, 0, 1))
        return self._normalised(raw)

    def decode_tiled(self, latent: torch.Tensor, tile: int) -> Iterator[Rows]:
        """Rows of `decode(latent)`, decoded tile by tile (tile in latent px) with whole-image norm statistics."""
        raw = self._raw(latent)
        head, blocks = self.decoder[:DECODER_HEAD], list(self.decoder[DECODER_HEAD:DECODER_HEAD + 3])
        with self._global_norms(blocks, head, raw, tile):
            yield from tiled_map(lambda t: self.decoder(_window(raw, t)).clamp(0, 1), tuple(raw.shape[-2:]), tile,
                                 self.tile_margin, 0, self.scale)

    def _lr_head(self) -> nn.Sequential:
        if self.lr_head is None:
            raise ValueError(f"this TAEF2 codec has no LR head ({LR_HEAD_FILE} is not in its weights folder): "
                             "encode the x4 bicubic upscale instead")
        return self.lr_head

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(self.device, self.dtype, memory_format=torch.channels_last)

    def _normalised(self, raw: torch.Tensor) -> torch.Tensor:
        return ((raw - self.latent_mean) / self.latent_std).contiguous()

    def _raw(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 4 or latent.shape[1] != self.channels:
            raise ValueError(f"expected a latent [B, {self.channels}, h, w], got shape {tuple(latent.shape)}")
        raw = latent.to(self.device, torch.float32) * self.latent_std + self.latent_mean
        return raw.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @contextmanager
    def _global_norms(self, blocks: list[Block], prefix: nn.Module, source: torch.Tensor, tile: int):
        """Within: each mid block normalises with the statistics of its whole input (`prefix`, then the blocks, on `source`).

        One tiled pass per block at latent resolution; block j's pass uses the statistics of 0..j-1.
        """
        try:
            for j, block in enumerate(blocks):
                upto = nn.Sequential(prefix, *blocks[:j], block.pool[0])
                moments = RunningMoments()
                for _, rows in tiled_map(lambda t: upto(_window(source, t)), tuple(source.shape[-2:]), tile,
                                         self.tile_margin, 0, 1):
                    moments.add(rows)
                norm = block.pool[1]
                mean, square = ((m / moments.count).flatten(1).unflatten(1, (norm.num_groups, -1)).mean(-1)
                                for m in (moments.total, moments.squares))
                norm.statistics = (mean.float(), (square - mean * mean).float())
            yield
        finally:
            for block in blocks:
                block.pool[1].statistics = None


def _window(x: torch.Tensor, tile) -> torch.Tensor:
    return x[..., tile.y0:tile.y0 + tile.h, tile.x0:tile.x0 + tile.w]
