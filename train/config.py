"""Every trainer option: one dataclass, read from a TOML file and overridden by command-line flags.

Each field's `doc` is its documentation; `--help` prints it and `train/configs/default.toml` repeats
it as comments. Flags are the field names with dashes (`max_steps` -> `--max-steps`); booleans also
take `--no-...`; pairs take two values (`--lora-ranks 64 64`).
"""
from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

OBJECTIVES = ("teasr", "tadsr")
PERCEPTUAL_NETS = ("alex", "vgg", "dists")
CODECS = ("auto", "pixel", "taef2")
OPTIMIZERS = ("adamw", "rmsprop")


def opt(default, doc: str):
    """A config field with its documentation (lists/tuples are stored as tuples)."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class TrainConfig:
    # ---- run ---------------------------------------------------------------------------------
    preset: str = opt("small", "model size: teasr_core.network.model preset (tiny, small, small-pixel, base, qwen-image); "
                               "ignored with `base`")
    data: str = opt("", "folder of HR photos (recursive); required unless data_cache is set")
    data_cache: str = opt("", "pair caches made by `python -m train.pair_cache` (degraded pairs and their latents, "
                              "made once), comma-separated; when set, batches come from them and `data` only feeds "
                              "the sample grid")
    cache_shards: int = opt(0, "data_cache: use only the first N shards of each cache (0 = all)")
    val_data: str = opt("", "folder for the fixed sample-grid batch (default: `data`)")
    out: str = opt("runs/teasr", "output folder: checkpoints/, state/, samples/, metrics.jsonl, train.log")
    max_steps: int = opt(10000, "optimizer steps to train to (a resumed run continues up to this count)")
    resume: bool = opt(False, "continue from the latest training state in `out` (bit-exact on CPU)")
    objective: str = opt("teasr", "teasr: single-model self-adversarial distillation; tadsr: TAD-SR baseline "
                                  "(frozen teacher + HFSD + time-aware discriminator)")
    seed: int = opt(0, "seed of the model init, data streams and loss noise")
    device: str = opt("", "cuda / cpu / cuda:N; empty = cuda if available (torchrun: cuda:LOCAL_RANK)")
    cpu_threads: int = opt(0, "torch intra-op threads on CPU; 0 = torch's default. On a shared, loaded machine 1 "
                              "is much faster (small preset, crop 128, batch 4 on 2 busy cores: 1.0 s/step vs 2-6)")
    fsdp: bool = opt(False, "multi-GPU: shard parameters per transformer block with FSDP2 instead of DDP")

    # ---- model -------------------------------------------------------------------------------
    base: str = opt("", "initial weights: a full TEASR checkpoint or a Qwen-Image base transformer "
                        "(file or diffusers folder); empty = fresh init of `preset`")
    codec: str = opt("auto", "latent space: pixel (lossless space-to-depth), taef2 (FLUX.2 tiny autoencoder) or auto "
                             "(the `vae` file when set; else pixel when the model's input channels are 3 s^2, as in tiny "
                             "and small-pixel; else taef2)")
    vae: str = opt("", "a Qwen-Image VAE file, the latent space of a Qwen-Image base: ComfyUI's "
                       "qwen_image_vae.safetensors or diffusers' vae/ folder (run by ComfyUI's implementation: train "
                       "in ComfyUI's Python, or set TEASR_COMFYUI_DIR); needs codec = auto")
    pixel_scale: int = opt(0, "pixel codec: pixels per latent pixel per side; 0 = the preset's (in_channels = 3 s^2)")
    full_finetune: bool = opt(True, "train every parameter (small presets from scratch); false = LoRA")
    lora_ranks: tuple = opt([0, 0], "LoRA ranks (noise branch, condition branch) when full_finetune = false")
    lora_alphas: tuple = opt([], "LoRA alphas (noise, cond); empty = alpha = rank")
    lora_save: str = opt("delta", "LoRA checkpoints: delta (only the trained tensors; load with a base) or "
                                  "merged (a full checkpoint: noise LoRA folded into the base)")
    fp8_base: bool = opt(False, "store the frozen base Linear weights of the blocks as fp8 e4m3 (LoRA training)")
    base_dtype: str = opt("fp32", "storage dtype of frozen base weights (fp32, bf16); trained tensors stay fp32")
    bf16: bool = opt(True, "bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16 / AMX); fp32 on other "
                           "CPUs regardless (AVX2-only: bf16 convolutions ran ~100x slower than fp32)")
    gradient_checkpointing: bool = opt(False, "recompute transformer blocks in backward (memory for time)")
    compile_blocks: bool = opt(False, "torch.compile each transformer block (inside gradient checkpointing when on); "
                                      "the first steps compile")
    fuse_lora_down: bool = opt(True, "LoRA down-projections (A) of a dequantised fp8 base computed in the base's "
                                     "matmul: A's rows appended to the weight the dequantisation writes anyway")
    fp8_matmul: bool = opt(False, "fp8_base: run the base product as a real fp8 matmul (torch._scaled_mm, "
                                  "activations quantised per token) on GPUs with fp8 units; off = dequantise per "
                                  "layer and multiply in bf16 (faster at these sizes: BENCHMARKS.md)")
    context_file: str = opt("", "safetensors with a `context` [T, context_dim] tensor (e.g. the empty-prompt "
                                "text features) for models with a text stream; presets without one use null_context")

    # ---- optimisation ------------------------------------------------------------------------
    optimizer: str = opt("adamw", "adamw, or rmsprop: one state per trained value instead of two (the 20 B model's "
                                  "rank-128 dual LoRA: 1.2 B trained values, 4.8 GB less); its smoothing is betas[1], "
                                  "its epsilon adam_eps, no momentum")
    lr: float = opt(1e-4, "AdamW learning rate (constant after warm-up)")
    betas: tuple = opt([0.9, 0.99], "AdamW betas")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value; 0 = off")
    batch: int = opt(4, "images per device per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x grad_accum x world size)")
    ema_decay: float = opt(0.0, "EMA of the trained weights (e.g. 0.999); 0 = off. Checkpoints and samples use the EMA")
    stack_passes: bool = opt(True, "TEASR: the passes without grad that do not depend on each other run as one call "
                                   "on the batch dimension (5 passes in 2 calls); same losses and gradients")
    backward_per_group: bool = opt(True, "TEASR: back-propagate each loss group right after its forward, so only one "
                                         "pass's graph is alive; same gradients as one total backward")
    checkpoint_decoder: bool = opt(True, "TEASR: recompute the codec decoder feeding the pixel terms in backward "
                                         "instead of keeping its activations next to LPIPS's")

    # ---- data --------------------------------------------------------------------------------
    crop: int = opt(256, "HR crop side in pixels (the LR is crop / scale)")
    hr_downscale: float = opt(1.0, "shrink every HR photo by this factor (antialiased) before cropping, "
                                   "so grain and JPEG blocks of the HR are not learned as detail")
    hr_scale_min: float = opt(1.0, "draw a scale per crop, log-uniform in [max(this, crop / short side), 1]: the crop "
                                   "covers crop / s photo pixels shrunk to `crop` (detail at many scales; no photo enlarged)")
    light_share: float = opt(0.0, "share of batches degraded by train.data.light_degradation (mild blur, little noise) "
                                  "instead of the full Real-ESRGAN pipeline; real camera LR is mild")
    scale: int = opt(4, "super-resolution factor of the degradation")
    cache_images: bool = opt(True, "keep decoded photos in RAM")

    # ---- logging, checkpoints, samples ------------------------------------------------------
    log_every: int = opt(1, "write a metrics.jsonl row every N steps")
    ckpt_every: int = opt(1000, "write a checkpoint and a training state every N steps (and at the end)")
    ckpt_dtype: str = opt("", "checkpoint tensor dtype (fp16, bf16); empty = as trained")
    keep_states: int = opt(1, "training states kept in out/state (older ones are deleted)")
    sample_every: int = opt(500, "write a sample grid (LR | 1-step | 4-step | HR) every N steps; 0 = off")
    sample_images: int = opt(4, "images in the fixed sample batch")
    sample_steps: tuple = opt([1, 4], "sampling step counts shown in the grid, one column each")

    # ---- TEASR objective (teasr-paper.md 4.2; weights of the precursor's total loss) ----------
    w_any: float = opt(1.0, "L_any: RCGM any-step consistency")
    w_e2e: float = opt(0.25, "L_e2e: one-step consistency to sigma_target = 0")
    w_fm: float = opt(0.25, "L_FM: flow matching")
    w_adv: float = opt(0.25, "L_adv: fake-flow learning at negative time")
    w_rect: float = opt(0.25, "L_rect: rectification (fake-minus-real velocity)")
    w_jump: float = opt(0.0, "one-step regression: the jump to sigma_target = 0 (L_e2e's draw) regressed to the HR "
                             "latent (a velocity MSE against eps - x0); no extra network pass")
    sigma_weight_c: float = opt(0.0, "velocity-space MSEs of a start at sigma are weighted (1 + c^2) sigma^2 / (sigma^2 + c^2): "
                                     "0 = plain velocity MSE (the precursor's), which weights the error of the clean-sample "
                                     "estimate by 1 / sigma^2; c > 0 bounds that at (1 + c^2) / c^2 (large c: clean-sample MSE)")
    split_batch: bool = opt(False, "TwinFlow's batch split: L_any and L_FM on a quarter of the micro-batch each, the "
                                   "one-step terms (L_e2e, jump, L_adv, L_rect, pixel) on the other half")
    rect_clamp: float = opt(0.0, "L_rect: clamp the fake-minus-real velocity to [-c, c] per element (TwinFlow: 1); 0 = off")
    w_mse: float = opt(1.0, "pixel MSE of the one-step sample ([-1, 1] scale), times the pixel weight")
    w_lpips: float = opt(1.0, "perceptual distance (`perceptual_net`) of the one-step sample, times the pixel "
                              "weight; needs the converted weights, otherwise off (logged)")
    perceptual_net: str = opt("alex", "network of the perceptual term: alex (LPIPS-AlexNet, the metric the eval "
                                      "reports), vgg (LPIPS-VGG16) or dists (DISTS); train on one the eval does "
                                      "not score with, or its score rises without better images")
    w_l1: float = opt(0.0, "pixel L1 of the one-step sample ([0, 1] scale), times the pixel weight")
    pixel_window: int = opt(0, "pixel terms on a random window of this many latent pixels per side (0 = the whole "
                                "crop): the decoder's receptive field is bounded, so the window plus "
                                "`pixel_margin` decodes to nearly the pixels a whole decode gives, for less")
    pixel_margin: int = opt(4, "latent pixels of context decoded around the pixel window (inside the crop), "
                               "cropped off after decoding")
    pixel_weight_at_noise: float = opt(0.0, "pixel weight of a one-step start at sigma = 1; it falls "
                                            "linearly from 1 at sigma = 0 (0: the precursor's 1 - sigma; "
                                            "1: every start, pure noise included, must match the HR)")
    rcgm_dt: float = opt(0.01, "RCGM: the small step (in sigma) between the prediction and its target's start")
    rcgm_substeps: int = opt(2, "RCGM: Euler sub-steps of the model's own flow map building the target")
    any_sigma_min: float = opt(0.01, "L_any: sigma ~ U(0, 1) clamped to at least this")
    e2e_sigma_range: tuple = opt([0.01, 1.0], "L_e2e: one-step start sigma ~ U(lo, hi) (timestep-aware; "
                                              "[1, 1] = always from pure noise)")
    e2e_pure_noise_share: float = opt(0.0, "L_e2e: share of one-step starts at exactly sigma = 1 (the "
                                           "sampler's start); the rest follow e2e_sigma_range")
    own_path_share: float = opt(0.0, "L_e2e: share of one-step starts taken on the sampler's own path instead "
                                     "of the forward-noised HR: the state the `jump` sampler reaches after i of k "
                                     "steps from the noised condition (every term of the one-step sample applies)")
    own_path_steps: tuple = opt([1, 2, 4], "own-path starts: the step counts k whose states are drawn, uniform "
                                           "grid from own_path_start (each distinct state equally often)")
    own_path_start: float = opt(0.5, "own-path starts: the sampler's start strength (the upscale's default 0.5: "
                                     "the condition latent noised to sigma 0.5)")
    own_path_regression: float = opt(1.0, "own-path starts after at least one step: weight of their regressions "
                                          "(latent e2e / jump, pixel MSE / L1) relative to other starts; the "
                                          "perceptual and adversarial terms keep full weight. < 1: later steps "
                                          "are trained towards detail rather than the mean")
    fm_gap: float = opt(0.05, "L_FM: sigma_target = sigma - U(0, fm_gap * sigma)")
    fake_sigma_range: tuple = opt([0.02, 0.98], "L_adv / L_rect: sigma of the re-noised one-step sample")

    # ---- TAD-SR objective (peers.md 1.3-1.4) -----------------------------------------------
    teacher_steps: int = opt(4, "TAD-SR: Euler steps of the frozen teacher producing the regression target")
    w_reg: float = opt(1.0, "TAD-SR: regression of the one-step output to the teacher's output")
    w_hfsd: float = opt(1.0, "TAD-SR: high-frequency score distillation")
    w_gan: float = opt(0.02, "TAD-SR: generator hinge loss of the time-aware discriminator")
    hfsd_sigma_range: tuple = opt([0.02, 0.25], "TAD-SR: small noise level of the score distillation")
    disc_sigma_range: tuple = opt([0.02, 0.88], "TAD-SR: noise level of the discriminator inputs")
    disc_levels: int = opt(2, "TAD-SR: discriminator feature taps spread over the teacher's first half of blocks")
    disc_hidden: int = opt(256, "TAD-SR: hidden width of the discriminator heads")
    disc_lr: float = opt(0.0, "TAD-SR: discriminator learning rate; 0 = lr")

    def __post_init__(self):
        """Reject inconsistent settings before any model is built."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.perceptual_net not in PERCEPTUAL_NETS:
            raise ValueError(f"perceptual_net must be one of {PERCEPTUAL_NETS}, got {self.perceptual_net!r}")
        if self.pixel_window < 0 or self.pixel_margin < 0:
            raise ValueError(f"pixel_window and pixel_margin must be >= 0, got {self.pixel_window}, {self.pixel_margin}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.vae and self.codec != "auto":
            raise ValueError(f"vae = {self.vae!r} is the latent space; it cannot be combined with codec = {self.codec!r}")
        if self.lora_save not in ("delta", "merged"):
            raise ValueError(f"lora_save must be 'delta' or 'merged', got {self.lora_save!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.base_dtype not in ("fp32", "bf16"):
            raise ValueError(f"base_dtype must be fp32 or bf16, got {self.base_dtype!r}")
        if self.ckpt_dtype not in ("", "fp16", "bf16"):
            raise ValueError(f"ckpt_dtype must be empty, fp16 or bf16, got {self.ckpt_dtype!r}")
        ranks = tuple(int(r) for r in self.lora_ranks)
        if len(ranks) != 2 or min(ranks) < 0:
            raise ValueError(f"lora_ranks must be two ranks >= 0, got {self.lora_ranks}")
        if self.full_finetune and any(ranks):
            raise ValueError("full_finetune = true trains every weight; set lora_ranks = [0, 0] or full_finetune = false")
        if not self.full_finetune and not any(ranks):
            raise ValueError("full_finetune = false needs lora_ranks > 0 for at least one branch")
        if self.lora_alphas and len(self.lora_alphas) != 2:
            raise ValueError(f"lora_alphas must be empty or two values, got {self.lora_alphas}")
        if self.fp8_base and self.full_finetune:
            raise ValueError("fp8_base stores frozen weights; it needs LoRA training (full_finetune = false)")
        if self.sigma_weight_c < 0 or self.rect_clamp < 0:
            raise ValueError(f"sigma_weight_c and rect_clamp must be >= 0, got {self.sigma_weight_c}, {self.rect_clamp}")
        if self.split_batch and self.batch < 4:
            raise ValueError(f"split_batch needs batch >= 4 (a quarter per term), got {self.batch}")
        if self.crop % self.scale:
            raise ValueError(f"crop {self.crop} must be a multiple of the scale {self.scale}")
        if not 0 < self.hr_scale_min <= 1 or not 0 <= self.light_share <= 1:
            raise ValueError(f"hr_scale_min must be in (0, 1] and light_share in [0, 1], got "
                             f"{self.hr_scale_min}, {self.light_share}")
        for name in ("batch", "grad_accum", "max_steps", "log_every", "ckpt_every", "keep_states",
                     "rcgm_substeps", "teacher_steps", "disc_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if len(self.sample_steps) < 1 or min(self.sample_steps) < 1:
            raise ValueError(f"sample_steps must list step counts >= 1, got {self.sample_steps}")
        if not 0 <= self.own_path_share <= 1 or not 0 < self.own_path_start <= 1:
            raise ValueError(f"own_path_share must be in [0, 1] and own_path_start in (0, 1], got "
                             f"{self.own_path_share}, {self.own_path_start}")
        if self.own_path_regression < 0:
            raise ValueError(f"own_path_regression must be >= 0, got {self.own_path_regression}")
        if len(self.own_path_steps) < 1 or min(self.own_path_steps) < 1:
            raise ValueError(f"own_path_steps must list step counts >= 1, got {self.own_path_steps}")
        for name in ("e2e_sigma_range", "fake_sigma_range", "hfsd_sigma_range", "disc_sigma_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{name} must be two values 0 <= lo <= hi <= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _coerce(value):
    """TOML / argparse lists become tuples (the dataclass is frozen and hashable)."""
    return tuple(value) if isinstance(value, list) else value


def load_toml(path: str | Path) -> dict:
    with open(path, "rb") as f:
        values = tomllib.load(f)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; see train/configs/default.toml")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.distill",
                                description="TEASR any-step SR distillation (see train/configs/default.toml)")
    p.add_argument("--config", type=Path, help="TOML file of options; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata["doc"]
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif f.type == "tuple":
            p.add_argument(flag, nargs="*", type=float if f.name.endswith(("range", "betas", "alphas")) else int,
                           default=None, help=doc)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=None, help=doc)
    return p


def parse_config(argv=None) -> TrainConfig:
    """Defaults <- TOML file (--config) <- flags."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    values = load_toml(path) if path else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return replace(TrainConfig(), **{k: _coerce(v) for k, v in values.items()})
