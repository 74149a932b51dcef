"""Training state for `--resume`: tensors in safetensors, everything else in a JSON sidecar. No pickle.

A state is a nested tree of dicts / lists / scalars / tensors (model weights, optimizer state as
torch returns it, EMA, RNG states, data-stream counters). `split_tree` moves every tensor into a
flat {path: tensor} dict and leaves a JSON skeleton with {"__tensor__": path} where it was; dicts
with non-string keys (torch optimizers index their state by int) become {"__items__": [[k, v], ...]}.
`join_tree` inverts it exactly. Files are `state-<step>.safetensors` then `state-<step>.json`; the
JSON is written last and names its tensor file, so a state is complete iff its JSON exists.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

TENSOR, ITEMS = "__tensor__", "__items__"


def split_tree(tree, tensors: dict, path: str = ""):
    """(JSON skeleton) of `tree`, filling `tensors` with its tensors (on CPU, contiguous, owned)."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: path}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {k: split_tree(v, tensors, f"{path}/{k}") for k, v in tree.items()}
        return {ITEMS: [[k, split_tree(v, tensors, f"{path}/{k}")] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [split_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store {type(tree).__name__} at {path!r} in a training state")


def join_tree(skeleton, tensors: dict):
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            return tensors[skeleton[TENSOR]]
        if ITEMS in skeleton:
            return {k: join_tree(v, tensors) for k, v in skeleton[ITEMS]}
        return {k: join_tree(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tree(v, tensors) for v in skeleton]
    return skeleton


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(folder: str | Path, step: int, tree: dict, keep: int = 1) -> Path:
    """Write state-<step> atomically (tensors, then the JSON that commits it); keep the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    skeleton = split_tree(tree, tensors)
    weights = folder / f"state-{step:08d}.safetensors"
    sidecar = folder / f"state-{step:08d}.json"
    _atomic_write(weights, lambda p: safetensors.torch.save_file(tensors, str(p)))
    document = {"step": step, "tensors": weights.name, "state": skeleton}
    _atomic_write(sidecar, lambda p: p.write_text(json.dumps(document)))
    for old in sorted(folder.glob("state-*.json"))[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink()
    return sidecar


def latest_state(folder: str | Path) -> Path | None:
    """The newest committed state's JSON in `folder`, or None."""
    states = sorted(Path(folder).glob("state-*.json"))
    return states[-1] if states else None


def load_state(sidecar: str | Path) -> dict:
    """The tree `save_state` wrote, tensors on the CPU (optimizers and models move them on load)."""
    sidecar = Path(sidecar)
    document = json.loads(sidecar.read_text())
    tensors = safetensors.torch.load_file(str(sidecar.with_name(document["tensors"])))
    return join_tree(document["state"], tensors)


# ---- random number generators ------------------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
