"""Degraded training pairs made once and kept: `python -m train.pair_cache` writes them, `CachedPairs` reads them.

Why: on a 2-core CPU, degrading a 256 px crop and encoding HR and condition with TAEF2 costs about as
much as a training step of the bundled model. Made once, the pairs (and their latents) are reused for
every step of every run, and runs that compare designs see exactly the same data.

    python -m train.pair_cache --data ../shared/data/train_pool --out data_local/pairs-taef2 \\
        --pairs 8192 --crop 256 --codec taef2 --hr-scale-min 0.5 --light-share 0.5

A cache is a folder of shards `pairs-NNNNN.safetensors` (`shard_size` pairs each) and `cache.json`
(the settings). Each shard holds `lr` uint8 [N, 3, crop/s, crop/s], `hr` uint8 [N, 3, crop, crop] and,
with a codec, `x0` / `cond` fp16 [N, C, crop/8, crop/8]: the normalised latents of the HR and of the
bicubic-upsampled LR (the model's condition). Shard k holds samples [k N, (k + 1) N) of the seeded
`PairStream`, whose randomness is counter-based, so a cache grows by re-running with a larger
`--pairs` and equals one made in a single go.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import PairStream, upsample_lr
from .degrade import DegradationConfig

SETTINGS = ("data", "crop", "scale", "seed", "codec", "hr_scale_min", "light_share", "shard_size", "batch")


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _codec(name: str):
    if name == "none":
        return None, {}
    if name != "taef2":
        raise ValueError(f"codec must be 'taef2' or 'none', got {name!r}")
    from teasr_core.codecs.taef2 import LATENT_MEAN, LATENT_STD, TAEF2Codec
    return TAEF2Codec(), {"name": "taef2", "latent_mean": list(LATENT_MEAN), "latent_std": list(LATENT_STD)}


def build(settings: dict, out: Path, pairs: int, log=print) -> list[Path]:
    """Write the shards of the first `pairs` samples that are not there yet; returns every shard path."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "cache.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        changed = {k: (old.get(k), settings[k]) for k in SETTINGS if old.get(k) != settings[k]}
        if changed:
            raise ValueError(f"{out} was made with other settings {changed}; use another folder")
    size, batch = settings["shard_size"], settings["batch"]
    if size % batch:
        raise ValueError(f"shard_size {size} must be a multiple of batch {batch}")
    codec, codec_config = _codec(settings["codec"])
    meta_path.write_text(json.dumps({**settings, "codec_config": codec_config}, indent=1))
    stream = PairStream(settings["data"], crop=settings["crop"], batch_size=batch, seed=settings["seed"],
                        degradation=DegradationConfig(scale=settings["scale"]), hr_scale_min=settings["hr_scale_min"],
                        light_share=settings["light_share"])
    paths = []
    for shard in range(-(-pairs // size)):
        path = out / f"pairs-{shard:05d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        t0 = time.perf_counter()
        stream.load_state_dict({"seed": settings["seed"], "samples_drawn": shard * size,
                                "batches_drawn": shard * size // batch, "num_images": len(stream.images)})
        parts: dict[str, list[torch.Tensor]] = {"lr": [], "hr": [], "x0": [], "cond": []}
        for _ in range(size // batch):
            lr, hr = next(stream)
            parts["lr"].append(_to_uint8(lr))
            parts["hr"].append(_to_uint8(hr))
            if codec is not None:
                with torch.no_grad():
                    parts["x0"].append(codec.encode(hr).half())
                    parts["cond"].append(codec.encode(upsample_lr(lr, settings["scale"])).half())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"first_sample": str(shard * size)})
        tmp.replace(path)
        log(f"{path.name}: {size} pairs in {time.perf_counter() - t0:.0f} s")
    return paths


def cache_shards(folder: Path, shards: int) -> tuple[dict, list[Path]]:
    meta_path = folder / "cache.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a pair cache (no cache.json); make one with "
                                "`python -m train.pair_cache`")
    paths = sorted(folder.glob("pairs-*.safetensors"))[:shards or None]
    if not paths:
        raise FileNotFoundError(f"{folder} holds no shards")
    return json.loads(meta_path.read_text()), paths


class CachedPairs:
    """Infinite, seeded, resumable batches from pair caches: dicts of lr, hr (float [0, 1]) and x0, cond.

    Several caches (e.g. made with different degradation mixes) are pooled; their crop, scale and
    codec must agree. Batch j draws its samples from a fresh permutation per epoch (seeded by
    (seed, epoch)), like `PairStream`; the state is the seed and the number of samples drawn.
    """

    def __init__(self, folders: str | Path | list, *, batch_size: int, seed: int = 0, device="cpu", shards: int = 0):
        folders = [Path(f) for f in (folders if isinstance(folders, list) else [folders])]
        found = [cache_shards(folder, shards) for folder in folders]
        self.meta = found[0][0]
        for folder, (meta, _) in zip(folders[1:], found[1:]):
            if any(meta.get(k) != self.meta.get(k) for k in ("crop", "scale", "codec_config")):
                raise ValueError(f"{folder} was made with another crop, scale or codec than {folders[0]}; "
                                 "pooled caches must agree on them")
        loaded = [load_file(str(p)) for _, paths in found for p in paths]
        self.tensors = {k: torch.cat([t[k] for t in loaded]) for k in loaded[0]}
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.samples_drawn = 0
        self._permutation: tuple[int, torch.Tensor] | None = None  # (epoch, order)

    def __len__(self) -> int:
        return len(self.tensors["hr"])

    def __iter__(self) -> "CachedPairs":
        return self

    def _index(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self))
        if self._permutation is None or self._permutation[0] != epoch:
            state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0]
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(int(state)))
            self._permutation = (epoch, order)
        return int(self._permutation[1][position])

    def __next__(self) -> dict[str, torch.Tensor]:
        index = torch.tensor([self._index(self.samples_drawn + i) for i in range(self.batch_size)])
        self.samples_drawn += self.batch_size
        batch = {}
        for name, t in self.tensors.items():
            picked = t[index].to(self.device)
            batch[name] = picked.float() / 255 if t.dtype == torch.uint8 else picked.float()
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "samples_drawn": self.samples_drawn, "num_images": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where state was taken (its seed wins); with other caches or shards, warn as PairStream does."""
        if state["num_images"] != len(self):
            warnings.warn(f"the caches now hold {len(self)} pairs, the saved stream {state['num_images']}: the "
                          "resumed stream will differ from an uninterrupted one")
        self.seed, self.samples_drawn = state["seed"], state["samples_drawn"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.pair_cache", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of HR photos (recursive)")
    p.add_argument("--out", required=True, type=Path, help="cache folder (created; re-run to extend)")
    p.add_argument("--pairs", type=int, required=True, help="total pairs the cache should hold")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="taef2", choices=("taef2", "none"), help="latents to store beside the pixels")
    p.add_argument("--hr-scale-min", type=float, default=0.5, help="see train/data.py")
    p.add_argument("--light-share", type=float, default=0.5, help="share of lightly degraded batches (train/data.py)")
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="degradation batch (shares intermediate resize scales)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["data"] = str(Path(args.data).resolve())
    build(settings, args.out, args.pairs)


if __name__ == "__main__":
    main()
