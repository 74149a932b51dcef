"""Reading .safetensors weight files without trusting them, and naming what does not fit.

The header is validated (pickles, Git LFS pointers, corruption and truncation are named) before any
tensor is read; `check_names` reports missing, unexpected and wrongly shaped tensors by name. Every
weight file TEASR reads goes through here: our checkpoints, Qwen-Image bases, dual-LoRA files, text
features (formats/) and the Qwen-Image VAE (codecs/). Imports nothing of teasr_core.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_ONLY = ("TEASR checkpoints and Qwen-Image base weights are .safetensors files; "
                    "refusing to unpickle .ckpt/.pt/.pth")
MAX_HEADER_BYTES = 100_000_000          # safetensors' own limit


class CheckpointError(ValueError):
    """A weight file that cannot be loaded as asked; the message says which file and why."""


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


def read_header(path: Path) -> dict:
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


def header_shapes(header: dict, prefix: str = "") -> dict[str, tuple]:
    return {name[len(prefix):]: tuple(info["shape"]) for name, info in header.items()
            if name != "__metadata__" and name.startswith(prefix)}


def read_tensors(path: Path, device, prefix: str = "", names: set | None = None) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix` (and, prefix stripped, are in `names` if given), loaded
    straight onto `device`."""
    read_header(path)
    try:
        with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
            return {name[len(prefix):]: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)
                    and (names is None or name[len(prefix):] in names)}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _not_safetensors(path, str(e)) from None


def tensor_shapes(tensors: dict) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def check_names(path, expected: dict, found: dict, claim: str) -> None:
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

