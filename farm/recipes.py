"""Named compression recipes: presets of the ``compress`` section of a job config.

A job says ``compress: {recipe: fast, ...}``; the preset fills in every key the job does not set
(the job's own keys win, nested sections key by key). ``paper`` is the paper's recipe (method.md §4-5:
constant Adam 1e-4, batch 64, a fresh 100-filter student per neuron, one pruning round at tau 0.9,
the same loop to retrain), for clusters with the paper's budget. The others are for small budgets;
benchmarks/README.md "Recipes at equal compute" has the measurements that chose them.
"""

from __future__ import annotations

import copy
from typing import Any

# Smoothing (method.md §4) at the paper's interval, 500 k images, and not at the end of a run: each
# smoothing of a trained model costs fidelity until training recovers from it (measured on a published
# shared slice: R² to the teacher 0.857 -> 0.750 -> 0.605 after one and two smoothings), so a short
# run must not smooth 24 times or end on one. Runs of >= 500 k images still smooth as the paper does.
_SMOOTH = {"smooth_every_images": 500_000, "smooth_at_end": False}

RECIPES: dict[str, dict[str, Any]] = {
    # method.md §4-§5, as published (apart from BN recalibration, see DistillConfig).
    "paper": {
        "distill": {"lr": 1e-4, "lr_schedule": "constant", "batch_size": 64, "standardize_targets": False},
        "retrain": {"lr": 1e-4, "lr_schedule": "constant", "batch_size": 64, "standardize_targets": False},
        "prune": {"tau": 0.9, "criterion": "reconstruction"},
    },
    # one student per neuron, trained fast: z-scored targets, a high Adam rate annealed to 0; pruned
    # one layer at a time, each followed by a pass of retraining, which recovers enough to prune at
    # tau 0.85 (demo, 4 neurons: 0.9 -> 2,010 params, 0.85 -> 1,489, both above the teacher's r2_ER).
    "fast": {
        "distill": {"lr": 3e-3, "lr_schedule": "cosine", "standardize_targets": True, **_SMOOTH},
        "retrain": {"lr": 1e-3, "lr_schedule": "cosine", "standardize_targets": True, **_SMOOTH},
        "prune": {"tau": 0.85, "criterion": "reconstruction", "iterative": True},
        "iterative_retrain_passes": 1.0,
    },
    # one shared student for all the job's neurons (farm.shared_start), then per neuron: its slice,
    # pruned and retrained alone.
    "shared": {
        "shared": {"early_filters": 16, "late_filters": 32,
                   "distill": {"lr": 3e-3, "lr_schedule": "cosine", "standardize_targets": True, **_SMOOTH}},
        "retrain": {"lr": 1e-3, "lr_schedule": "cosine", "standardize_targets": True, **_SMOOTH},
        "prune": {"tau": 0.85, "criterion": "reconstruction", "iterative": True},
        "iterative_retrain_passes": 1.0,
    },
}


def merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, nested dicts merged key by key (copies; inputs untouched)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_recipe(section: dict) -> dict:
    """A job's ``compress`` section with its ``recipe`` preset filled in (the job's keys win); the
    ``recipe`` key stays, so the run records which preset it used. No ``recipe``: unchanged."""
    section = dict(section or {})
    name = section.get("recipe")
    if name is None:
        return section
    if name not in RECIPES:
        raise ValueError(f"compress.recipe: {name!r} is not a recipe; choose one of {sorted(RECIPES)}")
    return merge(RECIPES[name], section)


def compress_section(base: dict, recipe: str, sets: list[str] | None = None) -> dict:
    """For benchmarks: ``base`` (a job's compress section) with ``recipe``'s keys put over it, then
    dotted ``key=value`` overrides (YAML values)."""
    from farm.dataclass_dict import apply_overrides

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    base = {k: v for k, v in dict(base or {}).items() if k not in ("recipe", "shared")}
    return apply_overrides({**merge(base, RECIPES[recipe]), "recipe": recipe}, sets)
