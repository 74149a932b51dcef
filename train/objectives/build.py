"""Building the objective a training config names. Kept apart from the shared helpers in the package's
__init__.py, which both objectives import: the package importing them back would be an import circle.
"""
from __future__ import annotations

from .tadsr import TadsrObjective
from .teasr import TeasrObjective


def build_objective(cfg, dit, codec, lpips, device):
    """The objective named by cfg.objective; `dit` is the unwrapped model (TAD-SR copies its teacher from it)."""
    if cfg.objective == "teasr":
        return TeasrObjective(cfg, codec, lpips)
    return TadsrObjective(cfg, dit, device)
