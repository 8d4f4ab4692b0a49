"""Matplotlib figures for neuron runs and jobs. Every function returns a Figure (Agg backend).

Paper references: filter weights (Fig 1j), compact vs teacher R² (Fig 1h), filters per layer (Fig 3a).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files here; never open windows (workers have no display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pruning_history_figure(history: Sequence[Mapping], title: str = ""):
    """Filters kept per pruned layer and R² to the teacher after each step (history from prune)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    layers = [h.get("layer") for h in history]
    labels = [f"L{l}" if l is not None else str(i) for i, l in enumerate(layers)]
    before = [h.get("filters_before", np.nan) for h in history]
    after = [h.get("filters_after", np.nan) for h in history]
    x = np.arange(len(history))
    a.bar(x - 0.2, before, 0.4, label="before", color="0.7")
    a.bar(x + 0.2, after, 0.4, label="after", color="C0")
    a.set_xticks(x, labels)
    a.set_ylabel("filters")
    a.set_title("pruning, deepest layer first")
    a.legend(frameon=False)
    r2 = [h.get("r2_teacher", np.nan) for h in history]
    b.plot(x, r2, "o-")
    b.set_xticks(x, labels)
    b.set_ylabel("R² to teacher (pruning images)")
    b.set_ylim(min(0.0, np.nanmin(r2) if len(r2) else 0.0), 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def filter_weights_figure(model, max_filters: int = 12, title: str = ""):
    """Paper Fig 1j style: layer-0 RGB kernels, layer 1-4 depthwise kernels, readout maps."""
    k = model.spec.filters
    rows = 6
    cols = min(max(k), max_filters)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.95), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    w0 = model.layer0_conv.weight.detach().cpu().numpy()  # (K0, 3, 5, 5)
    for j in range(min(k[0], cols)):
        img = w0[j].transpose(1, 2, 0)
        m = np.abs(img).max() or 1.0
        axes[0, j].imshow(0.5 + 0.5 * img / m, interpolation="nearest")
    axes[0, 0].set_title("layer 0 (RGB)", fontsize=7, loc="left")
    for l in range(1, 5):
        w = model.depthwise(l).weight.detach().cpu().numpy()[:, 0]  # (K_{l-1}, 5, 5)
        for j in range(min(len(w), cols)):
            m = np.abs(w[j]).max() or 1.0
            axes[l, j].imshow(w[j], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
        axes[l, 0].set_title(f"layer {l} depthwise", fontsize=7, loc="left")
    if model.spec.n_outputs == 1:
        maps = model.readout_weights().detach().cpu().numpy()  # (R, R, K4)
        for j in range(min(maps.shape[2], cols)):
            m = np.abs(maps[:, :, j]).max() or 1.0
            axes[5, j].imshow(maps[:, :, j], cmap="RdBu_r", vmin=-m, vmax=m)
        axes[5, 0].set_title("readout maps", fontsize=7, loc="left")
    fig.suptitle(title or f"filters {k}")
    fig.tight_layout()
    return fig


def r2_scatter_figure(x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str, title: str = ""):
    """Paper Fig 1h: per-neuron R² of the compact model against the teacher's."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.scatter(x, y, s=14)
    finite = np.isfinite(x) & np.isfinite(y)
    lo = min(0.0, np.min(x[finite]) if finite.any() else 0.0, np.min(y[finite]) if finite.any() else 0.0)
    hi = max(1.0, np.max(x[finite]) if finite.any() else 1.0, np.max(y[finite]) if finite.any() else 1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if finite.any():
        ax.set_title(title or f"median Δ = {np.median(y[finite] - x[finite]):+.3f}", fontsize=9)
    fig.tight_layout()
    return fig


def params_histogram_figure(params: Sequence[int], title: str = "compact model sizes"):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.hist(np.asarray(params), bins=min(20, max(5, len(params))), color="C0")
    ax.set_xlabel("parameters (Keras count)")
    ax.set_ylabel("models")
    ax.set_title(f"{title}: median {int(np.median(params)) if len(params) else 0:,}", fontsize=9)
    fig.tight_layout()
    return fig


def filters_per_layer_figure(filters: Sequence[Sequence[int]], title: str = "filters per layer"):
    """Paper Fig 3a: per paper layer 1..6 = [K0 (RGB), K0, K1, K2, K3, K4 (readout maps)]."""
    f = np.asarray(filters, dtype=float).reshape(-1, 5)
    paper = np.stack([f[:, 0], f[:, 0], f[:, 1], f[:, 2], f[:, 3], f[:, 4]], axis=1)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    rng = np.random.default_rng(0)
    for i in range(6):
        ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(paper)), paper[:, i], s=10, alpha=0.6)
        ax.plot([i + 0.7, i + 1.3], [np.median(paper[:, i])] * 2, "k", lw=2)
    ax.set_xticks(range(1, 7))
    ax.set_xlabel("paper layer")
    ax.set_ylabel("filters")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def pareto_figure(params: Sequence[float], r2: Sequence[float], front: Sequence[int],
                  chosen: int | None = None, labels: Sequence[str] | None = None, title: str = ""):
    """Sweep trials: parameters vs R² to the teacher, the Pareto front joined, the chosen one ringed."""
    p, r = np.asarray(params, float), np.asarray(r2, float)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.scatter(p, r, s=18, color="0.6", label="trials")
    if len(front):
        order = sorted(front, key=lambda i: p[i])
        ax.plot(p[order], r[order], "o-", color="C0", label="Pareto front")
    if chosen is not None:
        ax.scatter([p[chosen]], [r[chosen]], s=120, facecolors="none", edgecolors="C3", label="chosen")
    if labels is not None:
        for i, lab in enumerate(labels):
            ax.annotate(lab, (p[i], r[i]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("R² to teacher (held out)")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
