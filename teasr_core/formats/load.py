"""Loading TEASR models: full checkpoints, LoRA deltas over a base, the authors' dual-LoRA files.

A "lora" checkpoint (or a dual-LoRA file) is applied over a base: a full TEASR checkpoint or a
Qwen-Image base transformer. Tensors keep the dtype they are stored in unless `dtype` is given.
The file format itself is described in checkpoint.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .. import __version__
from ..network.model import DiTConfig, DualBranchDiT
from ..safetensors_io import CheckpointError, check_names, header_shapes, read_header, read_tensors, tensor_shapes
from ..sampling import ModelSampling
from .checkpoint import CODEC_PREFIX, FORMAT_VERSION, METADATA_KEY
from .dual_lora import convert_dual_lora, is_dual_lora_file
from .layout import castable, describe_config, finish_loading, fit_fp8_slots, fit_lora, is_delta_key, is_lora_key, meta_model
from .qwen_image import comfy_prefix, load_qwen_image_base, looks_like_qwen_base

BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "bundled" / "teasr-small.safetensors"


@dataclass
class TEASRCheckpoint:
    dit: DualBranchDiT
    codec: dict
    meta: dict
    codec_tensors: dict = field(default_factory=dict)   # the model's own codec weights (without "codec.")

    @property
    def name(self) -> str:
        """E.g. 'teasr-small-taef2': preset and codec."""
        return f"teasr-{self.meta.get('preset') or 'custom'}-{self.codec.get('name', 'unknown')}"

    @property
    def sampling(self) -> ModelSampling:
        """The settings the file recommends sampling with (end ratio, attention tile), see ModelSampling."""
        try:
            return ModelSampling.from_metadata(self.meta.get("sampling"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's sampling metadata {self.meta.get('sampling')!r} is unusable: {e} "
                                  "(re-export it with train.export)") from None


def _teasr_config(path: Path, header: dict) -> dict:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        shapes = header_shapes(header)
        if looks_like_qwen_base(header_shapes(header, comfy_prefix(shapes))):
            raise CheckpointError(
                f"{path} has no TEASR metadata; it looks like a Qwen-Image base transformer. Load it with "
                "load_qwen_image_base(path), or use it as the base of a TEASR LoRA checkpoint "
                "(load_checkpoint(lora, base=path); --base on the command line).")
        raise CheckpointError(f"{path} is a safetensors file without TEASR metadata (header key "
                              f"{METADATA_KEY!r}), so it is not a TEASR checkpoint.")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt TEASR metadata ({e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has TEASR checkpoint format_version {version!r}; this TEASR "
                              f"({__version__}) reads format_version {FORMAT_VERSION}. Update TEASR to load it.")
    if meta.get("kind") not in ("full", "lora"):
        raise CheckpointError(f"{path}: unknown checkpoint kind {meta.get('kind')!r} (expected 'full' or 'lora')")
    return meta


def read_metadata(path) -> dict:
    """The TEASR config of a checkpoint, reading only its header (for listings)."""
    path = Path(path)
    return _teasr_config(path, read_header(path))


def _config(path: Path, meta: dict) -> DiTConfig:
    try:
        return DiTConfig.from_dict(meta["dit"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the TEASR metadata has no usable 'dit' config ({e!r}); "
                              "was it written by a newer TEASR?") from None


def split_codec_tensors(tensors: dict) -> dict:
    """Take the `codec.` tensors out of a checkpoint's tensors (in place); returns them without the prefix."""
    names = [k for k in tensors if k.startswith(CODEC_PREFIX)]
    return {k[len(CODEC_PREFIX):]: tensors.pop(k) for k in names}


def _load_full(path: Path, meta: dict, device) -> tuple[DualBranchDiT, dict]:
    """The DiT of a full checkpoint, and the codec tensors it carries."""
    cfg = _config(path, meta)
    dit = meta_model(cfg)
    tensors = read_tensors(path, device)
    codec_tensors = split_codec_tensors(tensors)
    fit_fp8_slots(dit, tensors)
    fit_lora(dit, tensors, meta.get("lora_alphas", {}))
    check_names(path, tensor_shapes(dit.state_dict()), tensor_shapes(tensors),
                 f"the model its metadata describes, {describe_config(cfg, meta.get('preset'))}")
    dit.load_state_dict(tensors, strict=True, assign=True)
    return dit, codec_tensors


def _load_base(base: Path, cfg: DiTConfig, device) -> DualBranchDiT:
    """A full TEASR checkpoint or a Qwen-Image base transformer, as the base of a delta."""
    if base.is_dir():
        return load_qwen_image_base(base, cfg=cfg, device=device)
    header = read_header(base)
    if METADATA_KEY not in (header.get("__metadata__") or {}):
        return load_qwen_image_base(base, cfg=cfg, device=device)
    base_meta = _teasr_config(base, header)
    if base_meta["kind"] != "full":
        raise CheckpointError(f"the base {base} is itself a LoRA checkpoint; a base must be a full TEASR "
                              "checkpoint or a Qwen-Image base transformer")
    dit, _ = _load_full(base, base_meta, device)
    differ = [f"{f.name}: base {getattr(dit.cfg, f.name)!r}, LoRA {getattr(cfg, f.name)!r}" for f in fields(cfg)
              if f.name not in ("lora_ranks", "lora_alphas") and getattr(dit.cfg, f.name) != getattr(cfg, f.name)]
    if differ:
        raise CheckpointError(f"the base {base} is a different architecture than the LoRA expects: " + "; ".join(differ))
    dit.cfg = cfg
    return dit


def _apply_delta(dit: DualBranchDiT, path: Path, meta: dict, tensors: dict) -> None:
    """Replace the base's TEASR-trained tensors by the delta's (LoRA ranks may differ per layer)."""
    compute = dit.compute_dtype
    for name, t in tensors.items():
        if not is_lora_key(name) and castable(name, t):
            tensors[name] = t.to(compute)   # embedders must match the base's dtype; LoRA runs in any
    fit_lora(dit, tensors, meta.get("lora_alphas", {}))
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items() if is_delta_key(k)}
    check_names(path, expected, tensor_shapes(tensors),
                 f"the LoRA delta its metadata describes, {describe_config(dit.cfg, meta.get('preset'))}")
    dit.load_state_dict(tensors, strict=False, assign=True)


def load_checkpoint(path, *, device="cpu", dtype: torch.dtype | None = None, fp8: bool = False,
                    base=None) -> TEASRCheckpoint:
    """Load a TEASR checkpoint in eval mode.


    A "lora" checkpoint needs `base`: a full TEASR checkpoint or a Qwen-Image base transformer (file
    or diffusers folder); a full checkpoint is self-contained and ignores `base`. `fp8` stores the
    block weights as fp8; `dtype` casts everything else (fp8 weights and their scales stay).
    """
    path = Path(path)
    dual_lora = is_dual_lora_file(path)
    meta = None if dual_lora else read_metadata(path)
    codec_tensors: dict = {}
    if meta is not None and meta["kind"] == "full":
        dit, codec_tensors = _load_full(path, meta, device)
    else:
        if base is None:
            raise CheckpointError(f"{path} is a {'dual-LoRA file' if dual_lora else 'TEASR LoRA checkpoint'} (only "
                                  "trained tensors): pass base= (--base on the command line), a full TEASR "
                                  "checkpoint or a Qwen-Image base transformer file or diffusers folder")
        if dual_lora:   # the authors' naming, converted in memory with the default alphas
            tensors, meta = convert_dual_lora(path, base)
            tensors = {k: v.to(device) for k, v in tensors.items()}
        else:
            tensors = read_tensors(path, device)
            codec_tensors = split_codec_tensors(tensors)
        dit = _load_base(Path(base), _config(path, meta), device)
        _apply_delta(dit, path, meta, tensors)
    return TEASRCheckpoint(dit=finish_loading(dit, dtype, fp8), codec=meta.get("codec", {}), meta=meta,
                           codec_tensors={k: v.to("cpu") for k, v in codec_tensors.items()})


def bundled_checkpoint_path() -> Path:
    """The default model shipped in the repository."""
    if not BUNDLED_CHECKPOINT.is_file():
        raise CheckpointError(f"the bundled TEASR model {BUNDLED_CHECKPOINT} is missing; it ships with the "
                              "repository (restore it with git), or pass a checkpoint path explicitly")
    return BUNDLED_CHECKPOINT

