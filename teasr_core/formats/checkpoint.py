"""TEASR checkpoints and Qwen-Image base weights: safetensors only, never a pickle.

A TEASR checkpoint is one .safetensors file. Its tensors are the DiT state dict ("full") or only
the TEASR-trained parts ("lora": the LoRA factors, `time_text_embed_2` and a `null_context` if
the model has one), applied on top of a base. The header metadata key "teasr" holds the JSON
config: format_version, kind, preset, dit (DiTConfig.to_dict()), codec, lora_ranks, version,
training, sampling (the settings the model is best sampled with, e.g. {"end_ratio": 0.85}; optional), plus `lora_alphas`, {layer: [alpha_noise, alpha_cond]} for every layer with a LoRA,
because `merge_lora` leaves layers whose ranks and alphas differ from the config's.

Models are built on the meta device and the file's tensors are assigned into them, so loading a
20 B base never materialises a throw-away random init, and tensors keep the dtype they are stored
in unless `dtype` is given.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .. import __version__
from ..network.lora import BRANCHES, FP8, dual_lora_layers
from ..network.model import DiTConfig, DualBranchDiT
from ..sampling import check_end_ratio

FORMAT_VERSION = 1
METADATA_KEY = "teasr"
COMFY_PREFIX = "model.diffusion_model."
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "bundled" / "teasr-small.safetensors"
SAFETENSORS_ONLY = ("TEASR checkpoints and Qwen-Image base weights are .safetensors files; "
                    "refusing to unpickle .ckpt/.pt/.pth")
MAX_HEADER_BYTES = 100_000_000          # safetensors' own limit
QWEN_ROPE_AXES = (16, 56, 56)           # Qwen-Image's split of its 128-dim heads (frame, row, col)
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"


class CheckpointError(ValueError):
    """A weight file that cannot be loaded as asked; the message says which file and why."""


@dataclass
class TEASRCheckpoint:
    dit: DualBranchDiT
    codec: dict
    meta: dict

    @property
    def name(self) -> str:
        """E.g. 'teasr-small-taef2': preset and codec."""
        return f"teasr-{self.meta.get('preset') or 'custom'}-{self.codec.get('name', 'unknown')}"

    @property
    def end_ratio(self) -> float:
        """The sampling grid's end ratio the file recommends (0: uniform), see sampling.shifted_sigmas."""
        value = (self.meta.get("sampling") or {}).get("end_ratio", 0.0)
        try:
            return check_end_ratio(value)
        except ValueError:
            raise CheckpointError(f"the checkpoint's sampling metadata has end_ratio {value!r}; expected a number "
                                  "in [0, 1) (re-export it with train.export --end-ratio)") from None


# ---- reading safetensors without trusting them ------------------------------------------------
def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file: {reason}. {SAFETENSORS_ONLY}.")


def _sniff(head: bytes) -> str:
    """What the first bytes of a non-safetensors file look like, for the error message."""
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive (torch.save / PyTorch Lightning format)"
    if head[:1] == b"\x80":
        return "it is a Python pickle"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights themselves (run `git lfs pull`)"
    return "its first 8 bytes are not a plausible header length"


def _read_header(path: Path) -> dict:
    """The validated JSON header; catches pickles, corruption and truncation before any tensor is read."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a .safetensors file; a diffusers Qwen-Image transformer "
                              "folder loads with load_qwen_image_base(path) or as --base of a TEASR LoRA checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, f"it is only {size} bytes long")
        header_len = int.from_bytes(head, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors(path, _sniff(head) if header_len > MAX_HEADER_BYTES else
                                   f"truncated: the header alone should be {header_len} bytes, the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        entries = [info for name, info in header.items() if name != "__metadata__"]
        if not all(isinstance(info["shape"], list) and isinstance(info["dtype"], str) for info in entries):
            raise ValueError("a tensor entry lacks its shape or dtype")
        data_end = max((info["data_offsets"][1] for info in entries), default=0)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise _not_safetensors(path, f"corrupt header ({e})") from None
    available = size - 8 - header_len
    if data_end > available:
        raise _not_safetensors(path, f"truncated: its header describes {data_end} bytes of tensor data "
                                     f"but only {available} follow")
    return header


def _header_shapes(header: dict, prefix: str = "") -> dict[str, tuple]:
    return {name[len(prefix):]: tuple(info["shape"]) for name, info in header.items()
            if name != "__metadata__" and name.startswith(prefix)}


def _read_tensors(path: Path, device, prefix: str = "", names: set | None = None) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix` (and, prefix stripped, are in `names` if given), loaded
    straight onto `device`."""
    _read_header(path)
    try:
        with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
            return {name[len(prefix):]: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)
                    and (names is None or name[len(prefix):] in names)}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _not_safetensors(path, str(e)) from None


def _looks_like_qwen_base(shapes: dict) -> bool:
    return "img_in.weight" in shapes and "transformer_blocks.0.attn.to_q.weight" in shapes


def _comfy_prefix(shapes: dict) -> str:
    """ComfyUI's full checkpoints nest the diffusion model under `model.diffusion_model.`."""
    return COMFY_PREFIX if any(name.startswith(COMFY_PREFIX) for name in shapes) else ""


def _teasr_config(path: Path, header: dict) -> dict:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        shapes = _header_shapes(header)
        if _looks_like_qwen_base(_header_shapes(header, _comfy_prefix(shapes))):
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
    return _teasr_config(path, _read_header(path))


# ---- tensor-name rules ----------------------------------------------------------------------------
def _is_float8(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() == 1


def _castable(name: str, t: torch.Tensor) -> bool:
    """`dtype` options cast floating tensors, never fp8 weights or their scales."""
    return t.is_floating_point() and not _is_float8(t) and name.rpartition(".")[2] != "weight_scale"


def _is_lora_key(name: str) -> bool:
    return name.rpartition(".")[2].startswith("lora_")


def _is_delta_key(name: str) -> bool:
    """The tensors TEASR trains on top of a base: what a "lora" checkpoint holds."""
    return _is_lora_key(name) or name.startswith("time_text_embed_2.") or name == "null_context"


def _shapes(tensors: dict) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _check_names(path, expected: dict, found: dict, claim: str) -> None:
    """Raise naming the missing, unexpected and wrongly shaped tensors (first 10 of each)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} (file {list(found[k])}, model {list(expected[k])})"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong)):
        if names:
            more = f", ... and {len(names) - 10} more" if len(names) > 10 else ""
            problems.append(f"{len(names)} {label}: {', '.join(names[:10])}{more}")
    if problems:
        raise CheckpointError(f"{path}: its tensors do not match {claim}. " + "; ".join(problems))


def _describe(cfg: DiTConfig, preset: str | None = None) -> str:
    fields_text = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
    return f"preset {preset!r} ({fields_text})" if preset else f"DiTConfig({fields_text})"


# ---- fitting a freshly built model to a file's layout ---------------------------------------------
def _meta_model(cfg: DiTConfig) -> DualBranchDiT:
    with torch.device("meta"):
        return DualBranchDiT(cfg)


def _fit_fp8_slots(dit: DualBranchDiT, tensors: dict) -> None:
    """Layers whose file weight is fp8 get an fp8 weight and a per-channel scale slot."""
    for name, layer in dual_lora_layers(dit):
        weight = tensors.get(f"{name}.weight")
        if weight is not None and weight.dtype == FP8 and not layer.is_fp8:
            layer.weight = nn.Parameter(torch.empty(weight.shape, dtype=FP8, device="meta"), requires_grad=False)
            layer.weight_scale = torch.empty(weight.shape[0], device="meta")


def _fit_lora(dit: DualBranchDiT, tensors: dict, layer_alphas: dict) -> None:
    """Give every layer the LoRA ranks the file has (None where it has none), before a strict load.

    Alphas come from the file's `lora_alphas`; a layer it does not list keeps its configured
    alpha when the rank matches, else alpha = rank (what merge_lora sets).
    """
    for name, layer in dual_lora_layers(dit):
        ranks, alphas = [], []
        for k, branch in enumerate(BRANCHES):
            a, b = tensors.get(f"{name}.lora_{branch}_A"), tensors.get(f"{name}.lora_{branch}_B")
            rank = a.shape[0] if a is not None else b.shape[-1] if b is not None else 0
            if rank:
                setattr(layer, f"lora_{branch}_A", nn.Parameter(torch.empty(rank, layer.in_features, device="meta")))
                setattr(layer, f"lora_{branch}_B", nn.Parameter(torch.empty(layer.out_features, rank, device="meta")))
            else:
                setattr(layer, f"lora_{branch}_A", None)
                setattr(layer, f"lora_{branch}_B", None)
            stored = layer_alphas.get(name)
            ranks.append(rank)
            alphas.append(float(stored[k]) if stored else layer.alphas[k] if rank == layer.ranks[k] else float(rank))
        layer.ranks, layer.alphas = tuple(ranks), tuple(alphas)


def _cast_floating(dit: DualBranchDiT, dtype: torch.dtype) -> None:
    """Cast in place one tensor at a time, so a big model never exists twice."""
    for module in dit.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if _castable(name, t) and t.dtype != dtype:
                cast = t.detach().to(dtype)
                setattr(module, name, nn.Parameter(cast, requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter) else cast)


def _finish(dit: DualBranchDiT, dtype, fp8: bool) -> DualBranchDiT:
    """Optional fp8 storage of the block weights (from the loaded precision), then the dtype cast."""
    if fp8:
        dit.quantize_base_fp8()
    if dtype is not None:
        _cast_floating(dit, dtype)
    return dit.eval()


# ---- saving ----------------------------------------------------------------------------------------
def _check_codec(codec: dict, cfg: DiTConfig) -> None:
    """Refuse to write a checkpoint whose codec cannot feed its model."""
    if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
        raise ValueError(f"codec must be a dict with a 'name' (e.g. {{'name': 'pixel', 'scale': 8}}), got {codec!r}")
    channels = 3 * codec.get("scale", 8) ** 2 if codec["name"] == "pixel" else len(codec.get("latent_mean", ()))
    if channels and channels != cfg.in_channels:
        raise ValueError(f"codec {codec} gives {channels}-channel latents but the model takes {cfg.in_channels}")


def _file_tensors(state: dict, dtype) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each owning its storage (safetensors refuses shared or partial storage)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and _castable(name, t):
            t = t.to(dtype)
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if t.nbytes and (key in seen or storage.nbytes() != t.nbytes or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(key)
        out[name] = t
    return out


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    """Write `<path>.tmp` beside the target, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable (Windows cannot open folders)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(path, dit: DualBranchDiT, codec: dict, *, preset: str | None = None,
                    training: dict | None = None, sampling: dict | None = None, lora_only: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a TEASR checkpoint atomically; `dtype` (e.g. float16) shrinks the file.

    `lora_only` writes the delta, which is only valid on the exact base weights it was trained on:
    `merge_lora` rewrites base weights, so save a merged model in full.
    """
    state = dit.state_dict()
    if lora_only:
        state = {k: v for k, v in state.items() if _is_delta_key(k)}
    layer_alphas = {name: list(layer.alphas) for name, layer in dual_lora_layers(dit) if any(layer.ranks)}
    meta = checkpoint_metadata(dit.cfg, codec, kind="lora" if lora_only else "full", preset=preset,
                               layer_alphas=layer_alphas, training=training, sampling=sampling)
    return write_checkpoint(path, _file_tensors(state, dtype), meta)


def write_checkpoint(path, tensors: dict, meta: dict) -> Path:
    """Write tensors + TEASR metadata (from `checkpoint_metadata`) as one safetensors file, atomically."""
    path = Path(path)
    _atomic_save(tensors, path, {METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path


def checkpoint_metadata(cfg: DiTConfig, codec: dict, *, kind: str, preset: str | None = None,
                        layer_alphas: dict | None = None, training: dict | None = None,
                        sampling: dict | None = None) -> dict:
    """The header's TEASR config (see the module docstring); refuses a codec that cannot feed the model."""
    _check_codec(codec, cfg)
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "preset": preset,
        "dit": cfg.to_dict(),
        "codec": codec,
        "lora_ranks": list(cfg.lora_ranks),
        "lora_alphas": layer_alphas or {},
        "version": __version__,
        "training": training or {},
        **({"sampling": sampling} if sampling else {}),
    }


# ---- loading TEASR checkpoints -----------------------------------------------------------------
def _config(path: Path, meta: dict) -> DiTConfig:
    try:
        return DiTConfig.from_dict(meta["dit"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the TEASR metadata has no usable 'dit' config ({e!r}); "
                              "was it written by a newer TEASR?") from None


def _load_full(path: Path, meta: dict, device) -> DualBranchDiT:
    cfg = _config(path, meta)
    dit = _meta_model(cfg)
    tensors = _read_tensors(path, device)
    _fit_fp8_slots(dit, tensors)
    _fit_lora(dit, tensors, meta.get("lora_alphas", {}))
    _check_names(path, _shapes(dit.state_dict()), _shapes(tensors),
                 f"the model its metadata describes, {_describe(cfg, meta.get('preset'))}")
    dit.load_state_dict(tensors, strict=True, assign=True)
    return dit


def _load_base(base: Path, cfg: DiTConfig, device) -> DualBranchDiT:
    """A full TEASR checkpoint or a Qwen-Image base transformer, as the base of a delta."""
    if base.is_dir():
        return load_qwen_image_base(base, cfg=cfg, device=device)
    header = _read_header(base)
    if METADATA_KEY not in (header.get("__metadata__") or {}):
        return load_qwen_image_base(base, cfg=cfg, device=device)
    base_meta = _teasr_config(base, header)
    if base_meta["kind"] != "full":
        raise CheckpointError(f"the base {base} is itself a LoRA checkpoint; a base must be a full TEASR "
                              "checkpoint or a Qwen-Image base transformer")
    dit = _load_full(base, base_meta, device)
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
        if not _is_lora_key(name) and _castable(name, t):
            tensors[name] = t.to(compute)   # embedders must match the base's dtype; LoRA runs in any
    _fit_lora(dit, tensors, meta.get("lora_alphas", {}))
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items() if _is_delta_key(k)}
    _check_names(path, expected, _shapes(tensors),
                 f"the LoRA delta its metadata describes, {_describe(dit.cfg, meta.get('preset'))}")
    dit.load_state_dict(tensors, strict=False, assign=True)


def load_checkpoint(path, *, device="cpu", dtype: torch.dtype | None = None, fp8: bool = False,
                    base=None) -> TEASRCheckpoint:
    """Load a TEASR checkpoint in eval mode.

    A "lora" checkpoint needs `base`: a full TEASR checkpoint or a Qwen-Image base transformer (file
    or diffusers folder); a full checkpoint is self-contained and ignores `base`. `fp8` stores the
    block weights as fp8; `dtype` casts everything else (fp8 weights and their scales stay).
    """
    from .dual_lora import convert_dual_lora, is_dual_lora_file
    path = Path(path)
    dual_lora = is_dual_lora_file(path)
    meta = None if dual_lora else read_metadata(path)
    if meta is not None and meta["kind"] == "full":
        dit = _load_full(path, meta, device)
    else:
        if base is None:
            raise CheckpointError(f"{path} is a {'dual-LoRA file' if dual_lora else 'TEASR LoRA checkpoint'} (only "
                                  "trained tensors): pass base= (--base on the command line), a full TEASR "
                                  "checkpoint or a Qwen-Image base transformer file or diffusers folder")
        if dual_lora:   # the authors' naming, converted in memory with the default alphas
            tensors, meta = convert_dual_lora(path, base)
            tensors = {k: v.to(device) for k, v in tensors.items()}
        else:
            tensors = _read_tensors(path, device)
        dit = _load_base(Path(base), _config(path, meta), device)
        _apply_delta(dit, path, meta, tensors)
    return TEASRCheckpoint(dit=_finish(dit, dtype, fp8), codec=meta.get("codec", {}), meta=meta)


def bundled_checkpoint_path() -> Path:
    """The default model shipped in the repository."""
    if not BUNDLED_CHECKPOINT.is_file():
        raise CheckpointError(f"the bundled TEASR model {BUNDLED_CHECKPOINT} is missing; it ships with the "
                              "repository (restore it with git), or pass a checkpoint path explicitly")
    return BUNDLED_CHECKPOINT


# ---- Qwen-Image base transformers --------------------------------------------------------------
def _diffusers_folder(path: Path) -> Path:
    """The transformer folder of a diffusers pipeline (its `transformer/` subfolder also accepted)."""
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path} is a folder without config.json; expected a diffusers transformer "
                              f"folder (config.json + {DIFFUSERS_SINGLE} or sharded files with {DIFFUSERS_INDEX})")
    return folder


def _diffusers_files(folder: Path) -> list[Path]:
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt shard index ({e!r})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / DIFFUSERS_SINGLE).is_file():
        return [folder / DIFFUSERS_SINGLE]
    raise CheckpointError(f"{folder} has no {DIFFUSERS_SINGLE} or {DIFFUSERS_INDEX}. {SAFETENSORS_ONLY}.")


def _qwen_sources(path: Path) -> list[tuple[Path, str]]:
    """(file, key prefix) pairs holding a base transformer; refuses TEASR checkpoints."""
    if path.is_dir():
        return [(f, "") for f in _diffusers_files(_diffusers_folder(path))]
    header = _read_header(path)
    if METADATA_KEY in (header.get("__metadata__") or {}):
        raise CheckpointError(f"{path} is a TEASR checkpoint, not a Qwen-Image base; load it with load_checkpoint")
    return [(path, _comfy_prefix(_header_shapes(header)))]


def _rope_axes_for(head_dim: int) -> tuple[int, int, int]:
    """Qwen-Image's (16, 56, 56) for 128-dim heads; other widths split in the same proportion (even sizes)."""
    if head_dim == 128:
        return QWEN_ROPE_AXES
    spatial = 2 * round(head_dim * QWEN_ROPE_AXES[1] / 128 / 2)
    return head_dim - 2 * spatial, spatial, spatial


def infer_qwen_image_config(path) -> DiTConfig:
    """The DiTConfig of a Qwen-Image base (no LoRA), from diffusers' config.json or the tensor shapes.

    From shapes alone (patch 2 assumed): depth = number of transformer_blocks, width from img_in,
    head_dim from attn.norm_q, context_dim from txt_in, mlp_ratio from img_mlp, rope_axes by
    `_rope_axes_for(head_dim)`. Reads headers only.
    """
    path = Path(path)
    shapes = {}
    for file, prefix in _qwen_sources(path):
        shapes.update(_header_shapes(_read_header(file), prefix))
    needed = ("img_in.weight", "txt_in.weight", "transformer_blocks.0.attn.norm_q.weight",
              "transformer_blocks.0.img_mlp.net.0.proj.weight")
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise CheckpointError(f"{path} does not look like a Qwen-Image transformer: no {', '.join(absent)}")
    width, token_dim = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    cfg = DiTConfig(
        depth=len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}),
        heads=width // head_dim, head_dim=head_dim, in_channels=token_dim // 4,
        mlp_ratio=shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0] / width,
        context_dim=shapes["txt_in.weight"][1], rope_axes=_rope_axes_for(head_dim))
    if path.is_dir():
        config_path = _diffusers_folder(path) / "config.json"
        try:
            config = json.loads(config_path.read_text())
            patch = config.get("patch_size", 2)
            cfg = replace(cfg, depth=config["num_layers"], heads=config["num_attention_heads"],
                          head_dim=config["attention_head_dim"], context_dim=config["joint_attention_dim"],
                          in_channels=config["in_channels"] // patch ** 2, patch=patch,
                          rope_axes=tuple(config.get("axes_dims_rope", QWEN_ROPE_AXES)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{config_path}: not a usable QwenImageTransformer2DModel config ({e!r})") from None
    return cfg


def _stored_float_dtype(tensors: dict) -> torch.dtype:
    """The file's working precision: the commonest non-fp8 float dtype (bf16 if all are fp8)."""
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point() and not _is_float8(t))
    return counts.most_common(1)[0][0] if counts else torch.bfloat16


def _absorb_fp8_scales(tensors: dict, fp8_layers: set, float_dtype: torch.dtype) -> None:
    """ComfyUI fp8 files -> our layout.

    "Scaled fp8" files store weights as float8_e4m3fn with a per-tensor `<layer>.scale_weight`
    (newer mixed-precision files: `<layer>.weight_scale`) and a marker key `scaled_fp8`; plain fp8
    files have no scale (1). DualLoRALinear layers keep the fp8 weight with the scale expanded per
    output channel; everything else is dequantised to `float_dtype`. Activation scales
    (`scale_input` / `input_scale`) serve fp8 matmuls only and are dropped.
    """
    tensors.pop("scaled_fp8", None)
    for name in [k for k in tensors if k.endswith((".scale_input", ".input_scale"))]:
        del tensors[name]
    for name, t in list(tensors.items()):
        layer, _, leaf = name.rpartition(".")
        scale_key = next((f"{layer}.{s}" for s in ("scale_weight", "weight_scale")
                          if leaf == "weight" and f"{layer}.{s}" in tensors), None)
        if not _is_float8(t) and scale_key is None:
            continue
        scale = tensors.pop(scale_key).float().reshape(-1) if scale_key else torch.ones(1, device=t.device)
        if t.dtype == FP8 and leaf == "weight" and layer in fp8_layers:
            tensors[f"{layer}.weight_scale"] = scale.expand(t.shape[0]).contiguous()
        else:
            tensors[name] = (t.float() * scale.reshape(-1, *[1] * (t.ndim - 1))).to(float_dtype)


def read_qwen_base_tensors(path, names) -> dict[str, torch.Tensor]:
    """Only the named tensors of a Qwen-Image base (fp8 ones dequantized), e.g. its timestep embedder."""
    wanted = {n for name in names for n in (name, *(name.rpartition(".")[0] + s for s in (".scale_weight", ".weight_scale")))}
    tensors = {}
    for file, prefix in _qwen_sources(Path(path)):
        tensors.update(_read_tensors(file, "cpu", prefix, wanted))
    _absorb_fp8_scales(tensors, set(), _stored_float_dtype(tensors))
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} is not a Qwen-Image base: it has no {', '.join(missing)}")
    return tensors


def load_qwen_image_base(path, *, cfg: DiTConfig | None = None, device="cpu",
                         dtype: torch.dtype | None = None) -> DualBranchDiT:
    """A TEASR model initialised from a Qwen-Image base transformer, in eval mode.

    `path`: one .safetensors file in ComfyUI's layout (bare or `model.diffusion_model.` keys; bf16,
    fp8 or scaled fp8; a full checkpoint's VAE and text encoder are not read) or a diffusers
    transformer folder. `cfg` defaults to the inferred config (no LoRA). TEASR's rule: `time_text_embed_2` starts as a copy of `time_text_embed`, LoRA
    factors at their fresh init (B = 0), so the model starts as exactly the base.
    """
    path = Path(path)
    cfg = cfg or infer_qwen_image_config(path)
    if cfg.context_dim is None:
        raise CheckpointError("a Qwen-Image base has a text stream: cfg.context_dim must be set (3584 for Qwen-Image)")
    tensors = {}
    for file, prefix in _qwen_sources(path):
        tensors.update(_read_tensors(file, device, prefix))
    dit = _meta_model(cfg)
    _absorb_fp8_scales(tensors, {name for name, _ in dual_lora_layers(dit)}, dtype or _stored_float_dtype(tensors))
    _fit_fp8_slots(dit, tensors)
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items() if not _is_delta_key(k)}
    _check_names(path, expected, _shapes(tensors), f"a Qwen-Image transformer with {_describe(cfg)}")

    for name in [k for k in tensors if k.startswith("time_text_embed.")]:
        tensors["time_text_embed_2." + name.removeprefix("time_text_embed.")] = tensors[name].clone()
    compute = tensors["time_text_embed.timestep_embedder.linear_1.weight"].dtype
    for name, slot in dit.state_dict().items():
        if _is_lora_key(name):    # lora.py's init: A ~ N(0, 1/r), B = 0
            fresh = torch.randn(slot.shape, device=device) / math.sqrt(slot.shape[0]) if name.endswith("_A") \
                else torch.zeros(slot.shape, device=device)
            tensors[name] = fresh.to(compute)
    dit.load_state_dict(tensors, strict=True, assign=True)
    return _finish(dit, dtype, fp8=False)
