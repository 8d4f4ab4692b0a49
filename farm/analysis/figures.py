"""Figures of the analyses. Every function returns a ``matplotlib.figure.Figure`` (no pyplot: no global
figure registry, no display); ``save_figure`` writes one atomically. The caller logs them (MLflow)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from farm.files import atomic_path


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, e.g. .png, .pdf, .svg), atomically."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(f"{path}: give a file suffix (.png, .pdf, .svg) for the figure format")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


def gallery_figure(images: np.ndarray, responses: Sequence[float] | None = None,
                   labels: Sequence[str] | None = None, ncols: int = 6, title: str = "") -> Figure:
    """A grid of uint8 images (N, H, W, 3), each titled with its label and response."""
    images = np.asarray(images)
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig = Figure(figsize=(1.8 * ncols, 1.9 * nrows + (0.3 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(images[i])
        parts = []
        if labels is not None:
            parts.append(str(labels[i]))
        if responses is not None:
            parts.append(f"r={float(responses[i]):.2f}")
        ax.set_title("\n".join(parts), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def tuning_figure(dots, title: str = "") -> Figure:
    """Dot tuning (``DotTuningResult``): location map, size tuning, number tuning."""
    fig = Figure(figsize=(10, 3.2))
    a, b, c = fig.subplots(1, 3)
    g = dots.location_y
    step = g[1] - g[0] if len(g) > 1 else 1.0
    ext = (g[0] - step / 2, g[-1] + step / 2, g[-1] + step / 2, g[0] - step / 2)
    im = a.imshow(dots.location_map, extent=ext, cmap="viridis")
    a.plot(dots.preferred_location[1], dots.preferred_location[0], "r+", ms=10)
    a.set_title(f"location (dot r={dots.params.location_radius:g} px)")
    fig.colorbar(im, ax=a, fraction=0.046)
    b.plot(dots.radii, dots.size_responses, "o-")
    b.axvline(dots.preferred_radius, color="r", lw=0.8)
    b.set_xlabel("dot radius (px)")
    b.set_ylabel("response")
    b.set_title("size at the preferred location")
    sd = dots.number_responses.std(1)
    c.errorbar(dots.counts, dots.number_curve, yerr=sd, fmt="o-", capsize=2)
    c.set_xlabel("number of dots")
    c.set_title(f"number (r={dots.number_radius:g} px)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def saliency_figure(sal, title: str = "") -> Figure:
    """Image, heat map (response change with a smoothed patch) and the map over the image."""
    fig = Figure(figsize=(9, 3.2))
    a, b, c = fig.subplots(1, 3)
    h, w = sal.image.shape[:2]
    s = sal.params.stride
    ext = (sal.centers_x[0] - s / 2, sal.centers_x[-1] + s / 2, sal.centers_y[-1] + s / 2, sal.centers_y[0] - s / 2)
    a.imshow(sal.image)
    a.set_title(f"image (r={sal.base_response:.2f})")
    lim = float(np.abs(sal.heatmap).max()) or 1.0
    im = b.imshow(sal.heatmap, cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext)
    b.set_xlim(0, w)
    b.set_ylim(h, 0)
    b.set_title(f"response change (patch r={sal.params.patch_radius:g}, σ={sal.params.blur_sigma:g})")
    fig.colorbar(im, ax=b, fraction=0.046)
    c.imshow(sal.image)
    c.imshow(sal.heatmap, cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext, alpha=0.55)
    c.set_xlim(0, w)
    c.set_ylim(h, 0)
    c.set_title("overlay")
    for ax in (a, b, c):
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def smooth_minus_figure(sm, title: str = "") -> Figure:
    """Start image, smooth- image, one random control, and the responses."""
    fig = Figure(figsize=(11, 3.0))
    axes = fig.subplots(1, 4)
    axes[0].imshow(sm.image)
    axes[0].set_title(f"start r={sm.base_response:.2f}")
    axes[1].imshow(sm.smoothed)
    axes[1].set_title(f"smooth- r={sm.response:.2f}")
    if len(sm.control_images):
        axes[2].imshow(sm.control_images[0])
        axes[2].set_title(f"random r={sm.control_responses[0]:.2f}")
    for ax in axes[:3]:
        ax.set_axis_off()
    axes[3].plot(np.arange(len(sm.trace)), sm.trace, "o-", label="smooth- (greedy)")
    if len(sm.control_responses):
        axes[3].scatter(np.full(len(sm.control_responses), len(sm.trace) - 1), sm.control_responses,
                        color="0.5", label="random patches")
    axes[3].set_xlabel("patches smoothed")
    axes[3].set_ylabel("response")
    axes[3].legend(frameon=False, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def adversarial_figure(plus, minus=None, max_images: int = 4, title: str = "") -> Figure:
    """Base images with their adversarial+ (and adversarial-) versions and responses."""
    n = min(max_images, len(plus.base_images))
    rows = [("base", plus.base_images, plus.base_responses), ("adv+", plus.images, plus.responses)]
    if minus is not None:
        rows.append(("adv-", minus.images, minus.responses))
    fig = Figure(figsize=(1.9 * n, 2.0 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, imgs, resp) in enumerate(rows):
        for i in range(n):
            axes[r, i].imshow(imgs[i])
            axes[r, i].set_axis_off()
            axes[r, i].set_title(f"{name} r={resp[i]:.2f}", fontsize=7)
    fig.suptitle(title or f"adversarial ({plus.params.norm} budget {plus.params.budget:g} levels)")
    fig.tight_layout()
    return fig


def ablation_figure(abl, cumulative=None, title: str = "") -> Figure:
    """Invariance index per filter, the intact vs most-invariant ablated curve, and the cumulative run."""
    ncol = 3 if cumulative is not None else 2
    fig = Figure(figsize=(3.6 * ncol, 3.2))
    axes = fig.subplots(1, ncol)
    name = "DSI" if abl.kind == "size" else "dot-number invariance"
    axes[0].bar(np.arange(len(abl.index)), abl.index)
    axes[0].axhline(0.75, color="r", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_xlabel(f"filter (paper layer {abl.layer})")
    axes[0].set_ylabel(name)
    axes[1].plot(abl.conditions, abl.intact_curve, "o-", label="intact")
    if len(abl.index) and np.any(np.isfinite(abl.index)):
        j = int(np.nanargmax(abl.index))
        axes[1].plot(abl.conditions, abl.curves[j], "s--", label=f"filter {j} ablated")
    axes[1].set_xlabel("dot radius (px)" if abl.kind == "size" else "number of dots")
    axes[1].set_ylabel("response")
    axes[1].legend(frameon=False, fontsize=7)
    if cumulative is not None:
        axes[2].plot(np.arange(1, len(cumulative.index) + 1), cumulative.index, "o-")
        axes[2].set_ylim(0, 1.05)
        axes[2].set_xlabel("filters ablated (greedy, least first)")
        axes[2].set_ylabel(name)
        axes[2].set_title(f"cumulative, paper layer {cumulative.layer}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _by_layer(ax, layers, values, baseline=None, ylabel=""):
    values = np.asarray(values, np.float64)
    x = np.arange(len(layers))
    ax.boxplot([v[np.isfinite(v)] for v in values.T], positions=x, widths=0.5, showfliers=False)
    ax.plot(x, np.nanmean(values, 0), "o", color="C0", label="model pairs (mean)")
    if baseline is not None:
        ax.plot(x, np.nanmean(np.asarray(baseline), 0), "x--", color="0.4", label="random kernels")
    ax.set_xticks(x, [str(l) for l in layers])
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=7)


def cka_figure(cka, title: str = "") -> Figure:
    """Linear CKA between model pairs by code layer (``CKAResult``)."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    _by_layer(ax, cka.layers, cka.cka, ylabel="linear CKA")
    ax.set_xlabel("code layer")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"CKA by layer ({len(cka.pairs)} pairs, {cka.n_images} images)")
    fig.tight_layout()
    return fig


def kernel_similarity_figure(ks, title: str = "") -> Figure:
    """Best-match kernel similarity between model pairs by paper layer, with the random baseline."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    _by_layer(ax, ks.layers, ks.similarity, ks.baseline, ylabel="mean best |cos|")
    ax.set_xlabel("paper layer")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"kernel similarity ({len(ks.pairs)} pairs)")
    fig.tight_layout()
    return fig


def shared_sweep_figure(sweep, per_neuron_r2: Sequence[float] | None = None, title: str = "") -> Figure:
    """Median R² to the teacher against the early width K, with per-neuron models as a reference line."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    med = np.nanmedian(sweep.r2, axis=1)
    q25, q75 = np.nanpercentile(sweep.r2, 25, axis=1), np.nanpercentile(sweep.r2, 75, axis=1)
    ax.errorbar(sweep.ks, med, yerr=[med - q25, q75 - med], fmt="o-", capsize=2, label="shared (median, IQR)")
    if per_neuron_r2 is not None:
        ax.axhline(float(np.nanmedian(per_neuron_r2)), color="C1", ls="--", label="per-neuron compact (median)")
    ax.set_xscale("log")
    ax.set_xlabel("early filters K (layers 0-2)")
    ax.set_ylabel("R² to teacher")
    ax.legend(frameon=False, fontsize=7)
    ax.set_title(title or "shared compact model")
    fig.tight_layout()
    return fig


def synth_traces_figure(synth, title: str = "") -> Figure:
    """Response after every gradient step of each restart (``SynthResult``)."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    for t in synth.traces:
        ax.plot(np.arange(1, len(t) + 1), t, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("response")
    ax.set_title(title or f"synthesis ({synth.params.direction})")
    fig.tight_layout()
    return fig
