"""`python -m train.distill`: distil a TEASR any-step x4 SR model (or the TAD-SR baseline).

    python -m train.distill --preset tiny --data DIR --max-steps 20 --out DIR
    python -m train.distill --config train/configs/default.toml --data DIR --resume
    torchrun --nproc_per_node 2 -m train.distill ...            # DDP (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node 8 -m train.distill --fsdp ...     # FSDP2, one shard group per block

Outputs under `out`: checkpoints/step-N.safetensors (teasr_core.formats.checkpoint format: the CLI and the
ComfyUI loader read them unchanged), state/ (resume: safetensors + JSON, no pickle), samples/
(LR | 1-step | 4-step | HR grids through teasr_core.upscale.pipeline.upscale), metrics.jsonl, train.log.
A metrics row: step, loss (the weighted total), every term unweighted, lr, sec_per_step (the
optimizer step without data loading), fwd_grad / fwd_nograd (network passes per micro-batch with and
without autograd; TAD-SR's half-depth discriminator-encoder passes are enc_grad / enc_nograd), and
peak_mem_mb (CUDA max_memory_allocated during the step) or, on CPU, peak_rss_mb (process peak), and
cpu_hours: the CPU time (user + system, every thread of the main process) spent on the run so far,
carried across resumes - the budget that runs on a shared machine can be compared by.

Randomness is counter-based: micro-batch stream k = rank * grad_accum + micro has its own data
stream and, at every step, a loss-noise generator seeded from (seed, k, step). So resuming replays
nothing, and 1 process with grad_accum = 2 sees exactly the batches 2 processes with grad_accum = 1 see.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from teasr_core.codecs.build import codec_from_config
from teasr_core.codecs.codec import PixelCodec
from teasr_core.codecs.qwen_vae import load_vae_codec
from teasr_core.formats.checkpoint import save_checkpoint
from teasr_core.formats.layout import is_delta_key
from teasr_core.formats.load import load_checkpoint, read_metadata
from teasr_core.formats.qwen_image import infer_qwen_image_config, load_qwen_image_base
from teasr_core.formats.text_features import load_text_features
from teasr_core.network.lora import dual_lora_layers
from teasr_core.network.model import DualBranchDiT, preset
from teasr_core.safetensors_io import CheckpointError
from teasr_core.upscale.pipeline import Upscaler, UpscaleSettings, native_bf16, upscale

from .config import TrainConfig, parse_config
from .data import PairStream, upsample_lr
from .degrade import DegradationConfig
from .objectives import PassCounter
from .objectives.build import build_objective
from .pair_cache import CachedPairs
from .state import latest_state, load_state, rng_state, save_state, set_rng_state

log = logging.getLogger("train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mix_seed(*keys: int | str) -> int:
    """A 63-bit seed from any keys; SeedSequence keeps nearby keys' streams independent."""
    ints = [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ---- processes and devices ---------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int, cuda_available: bool) -> torch.device:
    """The option `device` for this process: empty = its GPU if any, else the CPU; a bare "cuda" (no
    index) = its own GPU, cuda:LOCAL_RANK, as torch.cuda.set_device needs an index."""
    device = torch.device(name or ("cuda" if cuda_available else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Process group from torchrun's environment (nccl on CUDA, gloo on CPU); single process otherwise."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


# ---- model --------------------------------------------------------------------------------------
@dataclass
class ModelSetup:
    dit: DualBranchDiT
    codec: object          # teasr_core.codecs.Codec
    codec_config: dict     # what the checkpoint stores
    preset: str | None
    context: torch.Tensor | None
    codec_tensors: dict = field(default_factory=dict)   # a base model's own codec weights, saved along
    sampling: dict | None = None   # a base model's sampling defaults (grid, attention tile), saved along


def make_codec(cfg: TrainConfig, in_channels: int, device):
    """The codec named by the config: the `vae` file when set; the pixel scale defaults to the model's
    (in_channels = 3 s^2)."""
    if cfg.vae:
        codec = load_vae_codec(cfg.vae, device=device)
        return codec, codec.config
    name = cfg.codec
    if name == "auto":
        side = math.isqrt(in_channels // 3)
        name = "pixel" if cfg.pixel_scale or 3 * side * side == in_channels else "taef2"
    if name == "taef2":
        from teasr_core.codecs.taef2 import LATENT_MEAN, LATENT_STD, TAEF2Codec
        return TAEF2Codec(device=device), {"name": "taef2", "latent_mean": list(LATENT_MEAN),
                                            "latent_std": list(LATENT_STD)}
    scale = cfg.pixel_scale or math.isqrt(in_channels // 3)
    if not cfg.pixel_scale and 3 * scale * scale != in_channels:
        raise ValueError(f"the model takes {in_channels}-channel latents, which no pixel codec gives; "
                         "set pixel_scale (the model's input layer is sized to match) or codec = taef2")
    return PixelCodec(scale), {"name": "pixel", "scale": scale}


def _with_lora(cfg: TrainConfig, dit_cfg):
    if cfg.full_finetune:
        return dit_cfg
    alphas = tuple(float(a) for a in cfg.lora_alphas) or None
    return replace(dit_cfg, lora_ranks=tuple(int(r) for r in cfg.lora_ranks), lora_alphas=alphas)


def build_model(cfg: TrainConfig, device, seed: int) -> ModelSetup:
    """Fresh preset init, a TEASR checkpoint, or a Qwen-Image base; LoRA added as configured."""
    dtype = DTYPES[cfg.base_dtype]
    codec_tensors: dict = {}
    sampling = None
    if not cfg.base:
        base_cfg = preset(cfg.preset)
        codec, codec_config = make_codec(cfg, base_cfg.in_channels, device)
        dit_cfg = _with_lora(cfg, replace(base_cfg, in_channels=codec.channels))
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # a 20 B preset never exists in fp32
        try:
            with torch.device(device):
                dit = DualBranchDiT(dit_cfg)
        finally:
            torch.set_default_dtype(default)
        name = cfg.preset
    elif _is_teasr_checkpoint(cfg.base):
        ckpt = load_checkpoint(cfg.base, device=device)
        codec_config = ckpt.codec
        codec_tensors, sampling = ckpt.codec_tensors, ckpt.meta.get("sampling")
        codec = codec_from_config(codec_config, device=device, vae=cfg.vae or None, tensors=codec_tensors)
        if cfg.codec != "auto" and codec_config.get("name") != cfg.codec:
            log.warning("the base checkpoint's codec %s is used (config says %r)", codec_config, cfg.codec)
        dit_cfg = _with_lora(cfg, ckpt.dit.cfg)
        if dit_cfg == ckpt.dit.cfg:
            dit = ckpt.dit
        else:  # new LoRA factors on a loaded base: fresh init of the factors, base tensors loaded
            torch.manual_seed(seed)
            with torch.device(device):
                dit = DualBranchDiT(dit_cfg)
            missing, unexpected = dit.load_state_dict(ckpt.dit.state_dict(), strict=False)
            if unexpected or any("lora_" not in k for k in missing):
                raise CheckpointError(f"{cfg.base}: cannot add LoRA to this checkpoint (missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}); start from a checkpoint without LoRA")
        name = ckpt.meta.get("preset")
    else:
        dit_cfg = _with_lora(cfg, infer_qwen_image_config(cfg.base))
        codec, codec_config = make_codec(cfg, dit_cfg.in_channels, device)
        if codec.channels != dit_cfg.in_channels:
            raise ValueError(f"the base {cfg.base} takes {dit_cfg.in_channels}-channel latents (its VAE's), "
                             f"the {codec.name} codec gives {codec.channels}; pass the base's VAE (--vae FILE, "
                             "e.g. qwen_image_vae.safetensors for Qwen-Image)")
        torch.manual_seed(seed)
        dit = load_qwen_image_base(cfg.base, cfg=dit_cfg, device=device, dtype=dtype)
        name = None
    dit.train()
    set_trainable(dit, cfg.full_finetune)
    for p in dit.parameters():  # frozen tensors in base_dtype (fp8 weights stay fp8)
        if not p.requires_grad and p.is_floating_point() and p.element_size() > 1:
            p.data = p.data.to(dtype)
    if cfg.fp8_base:
        dit.quantize_base_fp8()
    for _, layer in dual_lora_layers(dit):
        layer.fuse_down, layer.fp8_matmul = cfg.fuse_lora_down, cfg.fp8_matmul
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile_blocks:
        for block in dit.transformer_blocks:
            block.compile(dynamic=False)
    return ModelSetup(dit, codec, codec_config, name, load_context(cfg, dit, device), codec_tensors, sampling)


def _is_teasr_checkpoint(path: str) -> bool:
    try:
        read_metadata(path)
        return True
    except CheckpointError:
        return False


def never_used(dit: DualBranchDiT) -> set[str]:
    """Parameters that cannot get a gradient: the last block's context-stream output is discarded,
    so its context MLP and context attention output projection feed nothing (as in Qwen-Image)."""
    last = f"transformer_blocks.{dit.cfg.depth - 1}."
    return {n for n, _ in dit.named_parameters() if n.startswith((last + "txt_mlp.", last + "attn.to_add_out."))}


def set_trainable(dit: DualBranchDiT, full: bool) -> None:
    """Full fine-tune: every parameter that reaches the output. LoRA: what a TEASR delta checkpoint
    holds (the LoRA factors, the decoupled target-time embedder and the null context), so the delta
    is exactly what trained. Trained tensors are fp32 (AdamW master weights)."""
    unused = never_used(dit)
    for name, p in dit.named_parameters():
        p.requires_grad_((full and name not in unused) or is_delta_key(name))
        if p.requires_grad:
            p.data = p.data.float()


def make_optimizer(cfg: TrainConfig, params: list, device) -> torch.optim.Optimizer:
    """AdamW (two fp32 states per trained value) or RMSprop (one); multi-tensor kernels on CUDA."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.betas[1], eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay, foreach=device.type == "cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def load_context(cfg: TrainConfig, dit: DualBranchDiT, device) -> torch.Tensor | None:
    """Fixed text features [1, T, context_dim] for models with a text stream."""
    if dit.cfg.context_dim is None:
        return None
    if not cfg.context_file:
        raise ValueError(f"this model has a text stream (context_dim {dit.cfg.context_dim}): set context_file to a "
                         "safetensors file with a `context` [T, context_dim] tensor (e.g. empty-prompt features, "
                         "written by the TEASR Save Text Features node)")
    return load_text_features(cfg.context_file, dit.cfg.context_dim)[None].to(device)


# ---- the trainer ---------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, env: Dist):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        device = env.device
        if cfg.base_dtype != "fp32" and not (device.type == "cuda" and cfg.bf16):
            raise ValueError("base_dtype = bf16 needs bf16 autocast on CUDA (trained fp32 tensors meet bf16 ones)")
        self.autocast_enabled = cfg.bf16 and native_bf16(device)
        setup = build_model(cfg, device, mix_seed(cfg.seed, "init"))
        self.dit, self.codec, self.codec_config, self.preset = setup.dit, setup.codec, setup.codec_config, setup.preset
        self.codec_tensors, self.sampling = setup.codec_tensors, setup.sampling
        self.context = setup.context
        align = self.codec.scale * self.dit.cfg.patch
        if cfg.crop % align:
            raise ValueError(f"crop {cfg.crop} must be a multiple of {align} (codec scale x patch size)")
        self.lpips = load_lpips(device, cfg.perceptual_net) if cfg.objective == "teasr" and cfg.w_lpips > 0 else None
        self.objective = build_objective(cfg, self.dit, self.codec, self.lpips, device)
        self.engine = self._distribute()
        self.params = [p for p in self.engine.parameters() if p.requires_grad]
        self.names = [n for n, p in self.dit.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params, device)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None
        self.counts: Counter = Counter()
        self.net = PassCounter(self.engine, self.counts, "fwd", self.context)
        self.generator = torch.Generator(device)
        self.step = 0
        self.cpu_seconds_before = 0.0  # CPU time of earlier processes of this run (resume)
        self.streams: list[PairStream | CachedPairs] = []
        self.val_batch = None

    # ---- set-up pieces ----------------------------------------------------------------------
    def _distribute(self):
        if self.env.world == 1:
            return self.dit
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            if self.cfg.objective == "tadsr":
                raise ValueError("--objective tadsr keeps a full teacher copy per process; use DDP, not --fsdp")
            for block in self.dit.transformer_blocks:
                fully_shard(block)
            fully_shard(self.dit)
            return self.dit
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(self.dit, device_ids=ids, forward_sync_buffers=False)  # buffers (fp8 scales) are identical

    @property
    def stream_ids(self) -> list[int]:
        """Global indices of this process's micro-batch streams."""
        return [self.env.rank * self.cfg.grad_accum + m for m in range(self.cfg.grad_accum)]

    def _open_cache(self, k: int) -> CachedPairs:
        cfg = self.cfg
        stream = CachedPairs(cfg.data_cache.split(","), batch_size=cfg.batch, seed=mix_seed(cfg.seed, "data", k),
                             device=self.env.device, shards=cfg.cache_shards)
        meta = stream.meta
        if (meta["crop"], meta["scale"]) != (cfg.crop, cfg.scale):
            raise ValueError(f"{cfg.data_cache} holds {meta['crop']} px crops at x{meta['scale']}; the config says "
                             f"crop {cfg.crop}, scale {cfg.scale}")
        if "x0" in stream.tensors and meta.get("codec_config") != self.codec_config:
            log.info("%s holds latents of another codec (%s); this model's %s codec encodes its pixels every step",
                     cfg.data_cache, meta.get("codec_config", {}).get("name"), self.codec_config.get("name"))
            del stream.tensors["x0"], stream.tensors["cond"]
        return stream

    def open_data(self) -> None:
        cfg = self.cfg
        if not (cfg.data or cfg.data_cache):
            raise ValueError("no training data: pass --data DIR (a folder of HR photos) or --data-cache DIR")
        degradation = DegradationConfig(scale=cfg.scale)
        for k in self.stream_ids:
            if cfg.data_cache:
                stream = self._open_cache(k)
                if self.streams:
                    stream.tensors = self.streams[0].tensors  # one copy of the cache per process
            else:
                stream = PairStream(cfg.data, crop=cfg.crop, batch_size=cfg.batch, seed=mix_seed(cfg.seed, "data", k),
                                    device=self.env.device, degradation=degradation, cache=cfg.cache_images,
                                    hr_downscale=cfg.hr_downscale, hr_scale_min=cfg.hr_scale_min,
                                    light_share=cfg.light_share)
                if self.streams:
                    stream.images = self.streams[0].images  # one decoded-photo cache per process
            self.streams.append(stream)
        if cfg.sample_every and (self.env.main or (cfg.fsdp and self.env.world > 1)):  # FSDP samples collectively
            if cfg.val_data or cfg.data:
                val = PairStream(cfg.val_data or cfg.data, crop=cfg.crop, batch_size=cfg.sample_images,
                                 seed=mix_seed(cfg.seed, "val"), device=self.env.device, degradation=degradation,
                                 cache=False, hr_downscale=cfg.hr_downscale, hr_scale_min=cfg.hr_scale_min,
                                 light_share=cfg.light_share)
                self.val_batch = next(val)
            else:
                pairs = self.streams[0].tensors
                self.val_batch = tuple(pairs[k][:cfg.sample_images].to(self.env.device).float() / 255
                                       for k in ("lr", "hr"))

    # ---- one optimizer step -------------------------------------------------------------------
    @property
    def _manual_grad_sync(self) -> bool:
        """DDP with several backward calls per micro-batch (the TEASR objective's per-group backward): DDP's
        reducer expects one backward per forward, so gradients accumulate locally and are averaged after."""
        return self.env.world > 1 and not self.cfg.fsdp and self.cfg.objective == "teasr" and self.cfg.backward_per_group

    def _sync_context(self, last: bool):
        """Gradient all-reduce only on the last micro-batch."""
        if self.env.world == 1:
            return nullcontext()
        if self.cfg.fsdp:
            self.engine.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last and not self._manual_grad_sync else self.engine.no_sync()

    def train_step(self, batches: list) -> dict:
        """One optimizer step over this process's micro-batches; returns the log row.

        A micro-batch is (lr, hr) from a PairStream or a dict from CachedPairs, whose x0 / cond
        latents (when present) replace the encoding.
        """
        cfg, device = self.cfg, self.env.device
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.counts.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        for micro, (batch, stream) in enumerate(zip(batches, self.stream_ids)):
            if not isinstance(batch, dict):
                batch = dict(zip(("lr", "hr"), batch))
            self.generator.manual_seed(mix_seed(cfg.seed, "loss", stream, self.step))
            with self._sync_context(micro == len(batches) - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled):
                    with torch.no_grad():
                        x0 = batch["x0"] if "x0" in batch else self.codec.encode(batch["hr"]).float()
                        cond = batch["cond"] if "cond" in batch else \
                            self.codec.encode(upsample_lr(batch["lr"], cfg.scale)).float()
                    loss, terms = self.objective(self.net, x0, cond, batch["hr"], self.generator,
                                                 lambda part: (part / len(batches)).backward())
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0) + value.float() / len(batches)
        if self._manual_grad_sync:
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - cfg.ema_decay)
        self.step += 1
        names = sorted(sums)
        values = torch.stack([sums[n] for n in names])
        if self.env.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.AVG)
        passes = {k: n // len(batches) for k, n in sorted(self.counts.items())}  # per micro-batch
        row = {"step": self.step, **dict(zip(names, values.tolist())), "lr": lr,
               "sec_per_step": time.perf_counter() - start, **passes}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            row["peak_rss_mb"] = usage.ru_maxrss / 1024
        row["cpu_hours"] = self.cpu_seconds() / 3600
        return row

    def cpu_seconds(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return self.cpu_seconds_before + usage.ru_utime + usage.ru_stime

    # ---- weights out -----------------------------------------------------------------------------
    @torch.no_grad()
    def _swap_ema(self) -> None:
        if hasattr(self.engine, "reshard"):  # FSDP2 keeps the root's gathered weights after a no-grad
            self.engine.reshard()            # forward; drop them so the shards' new values are used
        for p, e in zip(self.params, self.ema):
            saved = p.detach().clone()
            p.detach().copy_(e)
            e.copy_(saved)

    @contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        self._swap_ema()
        try:
            yield
        finally:
            self._swap_ema()

    def _full_state(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors from FSDP shards (collective); plain tensors pass through."""
        return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]

    def export_dit(self) -> DualBranchDiT | None:
        """An inference model built from the weights (EMA if on), sharing storage where it can.

        Collective under FSDP; returns None on ranks other than 0.
        """
        if self.cfg.fsdp and self.env.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(self.engine, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = {k: v.detach() for k, v in self.dit.state_dict().items()}
        if self.ema is not None:
            state.update(zip(self.names, self._full_state(self.ema)))
        if not self.env.main:
            return None
        with torch.device("meta"):
            dit = DualBranchDiT(self.dit.cfg)
        if self.cfg.fp8_base:
            dit.quantize_base_fp8()
        dit.load_state_dict(state, strict=True, assign=True)
        return dit.eval()

    def save_checkpoint(self) -> Path | None:
        dit = self.export_dit()
        if dit is None:
            return None
        cfg = self.cfg
        lora_only = not cfg.full_finetune and cfg.lora_save == "delta"
        if not cfg.full_finetune and cfg.lora_save == "merged":
            dit.merge_lora("noise")
        path = self.out / "checkpoints" / f"step-{self.step:08d}.safetensors"
        training = {"step": self.step, "objective": cfg.objective, "base": cfg.base or None, "config": cfg.to_dict()}
        save_checkpoint(path, dit, self.codec_config, preset=self.preset, training=training, lora_only=lora_only,
                        dtype=DTYPES.get(cfg.ckpt_dtype), codec_tensors=self.codec_tensors, sampling=self.sampling)
        log.info("step %d: checkpoint %s", self.step, path)
        return path

    def training_state(self) -> dict:
        """Everything `resume` needs beyond the config; collective under FSDP/DDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = dict(zip(self.names, self._full_state([p.detach() for p in self.params])))
        streams = [s.state_dict() for s in self.streams]
        if self.env.world > 1:
            gathered = [None] * self.env.world
            dist.all_gather_object(gathered, streams)
            streams = [s for rank_streams in gathered for s in rank_streams]
        return {
            "step": self.step,
            "cpu_seconds": self.cpu_seconds(),
            "world": self.env.world,
            "grad_accum": self.cfg.grad_accum,
            "model": model,
            "ema": dict(zip(self.names, self._full_state(self.ema))) if self.ema is not None else {},
            "optimizer": get_optimizer_state_dict(self.engine, self.optimizer, options=full),
            "objective": self.objective.state_dict(),
            "rng": rng_state(),
            "streams": streams,
        }

    def save_state(self) -> None:
        state = self.training_state()
        if self.env.main:
            save_state(self.out / "state", self.step, state, keep=self.cfg.keep_states)

    def resume(self) -> bool:
        """Load the newest training state in out/state; False when there is none."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        sidecar = latest_state(self.out / "state")
        if sidecar is None:
            return False
        state = load_state(sidecar)
        if (state["world"], state["grad_accum"]) != (self.env.world, self.cfg.grad_accum):
            raise ValueError(f"{sidecar} was written by {state['world']} process(es) x grad_accum "
                             f"{state['grad_accum']}; resume with the same layout (the data streams depend on it)")
        with torch.no_grad():
            for p, name in zip(self.params, self.names):
                _load_into(p, state["model"][name])
            for e, name in zip(self.ema or [], self.names):
                _load_into(e, state["ema"][name])
        set_optimizer_state_dict(self.engine, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.objective.load_state_dict(state["objective"])
        set_rng_state(state["rng"])
        for stream, k in zip(self.streams, self.stream_ids):
            stream.load_state_dict(state["streams"][k])
        self.step = state["step"]
        self.cpu_seconds_before = state.get("cpu_seconds", 0.0)
        log.info("resumed from %s at step %d", sidecar, self.step)
        return True

    # ---- samples -------------------------------------------------------------------------------
    def sample_grid(self) -> Path | None:
        """LR (nearest) | one column per sample_steps | HR, one row per validation image."""
        if self.val_batch is None:
            return None
        lr_image, hr = self.val_batch
        model = self.dit
        columns = [torch.nn.functional.interpolate(lr_image, size=hr.shape[-2:], mode="nearest")]
        with self.ema_weights():
            upscaler = Upscaler(model, self.codec, self.context)
            for steps in self.cfg.sample_steps:
                settings = UpscaleSettings(steps=int(steps), scale=self.cfg.scale, seed=self.cfg.seed)
                columns.append(upscale(upscaler, lr_image, settings))
        if not self.env.main:
            return None
        grid = torch.cat([torch.cat(list(col.float().cpu()), dim=1) for col in columns + [hr]], dim=2)
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        return path

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> int | None:
        """Train to `max_steps`; returns the signal that stopped the run early, if one did."""
        with StopOnSignal() as stop:
            self._fit(stop)
        return stop.received

    def _fit(self, stop: StopOnSignal) -> None:
        cfg = self.cfg
        self.open_data()
        metrics = self.out / "metrics.jsonl"
        if cfg.resume and not self.resume():
            log.info("no training state in %s: starting from step 0", self.out / "state")
        if self.env.main:
            keep = [line for line in metrics.read_text().splitlines()
                    if json.loads(line)["step"] <= self.step] if metrics.exists() else []
            metrics.write_text("".join(line + "\n" for line in keep))
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.env.main, dynamic_ncols=True)
        while self.step < cfg.max_steps:
            row = self.train_step([next(s) for s in self.streams])
            bar.update(1)
            bar.set_postfix_str(f"loss={row['loss']:.4f} {row['sec_per_step']:.2f}s/step "
                                f"fwd_grad={row.get('fwd_grad', 0)} fwd_nograd={row.get('fwd_nograd', 0)}")
            if self.env.main and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                with open(metrics, "a") as f:
                    f.write(json.dumps(row) + "\n")
            stopping = stop.agreed(self.env)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps or stopping:
                self.save_checkpoint()
                self.save_state()
            if stopping:
                log.info("step %d: stopped by a signal; continue with --resume", self.step)
                break
            if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == cfg.max_steps):
                path = self.sample_grid()
                if path:
                    log.info("step %d: samples %s", self.step, path)
        bar.close()


class StopOnSignal:
    """SIGINT / SIGTERM (Ctrl-C, `timeout`, a job scheduler) end the run after the current step, with a
    checkpoint and a training state written, so `--resume` loses nothing; a second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without saving")
        self.received = signum
        log.warning("%s: stopping after this step (checkpoint and state will be written; "
                    "a second signal aborts)", signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, env: Dist) -> bool:
        """Whether to stop now; with several processes, stop when any one was signalled (a collective)."""
        if env.world == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _load_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a plain tensor or into this process's FSDP shard of it."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full.to(target.device), target.device_mesh, target.placements)
    target.copy_(full)


def load_lpips(device, net: str = "alex"):
    """The perceptual network `net` (LPIPS-Alex, LPIPS-VGG or DISTS) from the converted weight cache, or
    None (logged) when it is absent."""
    from teasr_core.eval.metrics import DISTS, LPIPS
    from teasr_core.eval.weights import MissingWeightsError
    try:
        return (DISTS() if net == "dists" else LPIPS(net=net)).to(device)
    except MissingWeightsError as e:
        log.warning("LPIPS disabled, the perceptual term is off (pixel MSE only): %s", e)
        return None


def setup_logging(out: Path, main: bool) -> None:
    if not main:
        logging.basicConfig(level=logging.WARNING)
        return
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(out / "train.log")])


def main(argv=None) -> None:
    cfg = parse_config(argv)
    env = setup_distributed(cfg)
    setup_logging(Path(cfg.out), env.main)
    try:
        trainer = Trainer(cfg, env)
        if env.main:
            (Path(cfg.out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            trained = sum(p.numel() for p in trainer.params)
            log.info("objective %s, %s model, %d trained parameters, %d process(es) on %s, global batch %d",
                     cfg.objective, trainer.preset or "custom", trained, env.world, env.device,
                     cfg.batch * cfg.grad_accum * env.world)
        stopped_by = trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if stopped_by is not None:
        raise SystemExit(128 + stopped_by)  # the shell's convention for a signalled program


if __name__ == "__main__":
    main()
