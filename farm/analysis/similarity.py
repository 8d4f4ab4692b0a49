"""Similarity across compact models: kernels, layer activity (CKA) and outputs (method.md §7.2, Fig. 3b-c).

Kernel similarity (per paper layer; filters as in ``farm.analysis.ablation``: paper layer 1 = the RGB
kernels, 75 numbers each; layers 2-5 = depthwise 5x5 kernels, 25 numbers each). For models A and B:

    s(A -> B) = mean over A's filters a of max over B's filters b of |cos(a, b)|
    similarity = (s(A -> B) + s(B -> A)) / 2

The baseline replaces both kernel sets by N(0, 1) kernels of the same counts and sizes. The paper
excluded paper layer 1 and the readout maps from its comparison; ``kernel_similarity`` computes layers
1-5 and the caller chooses.

CKA (linear, Kornblith et al. 2019): for activity X (n, p) and Y (n, q) to the same n images, with
centred columns, CKA = ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), computed here from the centred Gram
matrices: CKA = <Kc, Lc>_F / (||Kc||_F ||Lc||_F), K = X X'. A layer's activity is its whole
(K_l, H_l, W_l) output flattened. When that is wider than ``sketch_dim`` features, it is first
compressed by a count sketch (each feature added, with a random sign, into one of ``sketch_dim``
bins): inner products between images are kept in expectation, with relative error ~ 1/sqrt(sketch_dim)
(about 1.6 % at the default 4096), so the Gram matrix, and CKA, are those of the full activity up to that
error. The sketch of a layer is fixed by ``seed`` and the layer's shape.

Signal correlation: Pearson r between the outputs of two models over the same images; the paper's
mean r^2 over model pairs was 0.11 on 10 k normal images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from farm.analysis.common import check_images, check_size, eval_mode, model_device, to_model_input
from farm.models.compact import CompactModel

PAPER_LAYERS = (1, 2, 3, 4, 5)


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------

def layer_kernels(model: CompactModel, layer: int) -> np.ndarray:
    """Kernels of paper layer 1-5 as float64 rows (K, 75) (layer 1) or (K, 25) (layers 2-5)."""
    if layer == 1:
        w = model.layer0_conv.weight
    elif 2 <= layer <= 5:
        w = model.depthwise(layer - 1).weight
    else:
        raise ValueError(f"kernel similarity is defined for paper layers 1-5, got {layer}")
    return w.detach().double().cpu().reshape(w.shape[0], -1).numpy()


def matched_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric best-match similarity of two kernel sets a (Ka, d), b (Kb, d): the mean over each set's
    kernels of the largest |cos| with a kernel of the other set, averaged over both directions.
    Zero kernels (pruned or ablated) are left out."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel sets must be (K, d) with the same d, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    a, b = a[na > 0] / na[na > 0, None], b[nb > 0] / nb[nb > 0, None]
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    c = np.abs(a @ b.T)
    return float((c.max(1).mean() + c.max(0).mean()) / 2)


def random_kernel_baseline(ka: int, kb: int, d: int, n_draws: int = 100, rng=None) -> tuple[float, float]:
    """Mean and SD of ``matched_cosine`` between random N(0, 1) kernel sets of sizes ka, kb (dim d)."""
    rng = np.random.default_rng(rng)
    v = [matched_cosine(rng.standard_normal((ka, d)), rng.standard_normal((kb, d))) for _ in range(n_draws)]
    return float(np.mean(v)), float(np.std(v))


@dataclass
class KernelSimilarityResult:
    """layers: int (L,) paper layers. similarity: float64 (P, L) per model pair; baseline: float64
    (P, L) the random-kernel value for the same kernel counts; pairs: int (P, 2) model indices."""

    layers: np.ndarray
    pairs: np.ndarray
    similarity: np.ndarray
    baseline: np.ndarray
    params: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        out = {}
        for i, l in enumerate(self.layers):
            out[f"kernel_similarity_layer{l}"] = float(np.nanmean(self.similarity[:, i]))
            out[f"kernel_similarity_baseline_layer{l}"] = float(np.nanmean(self.baseline[:, i]))
        return out


def kernel_similarity(models: Sequence[CompactModel], layers: Sequence[int] = PAPER_LAYERS, n_pairs: int | None = 500,
                      n_baseline_draws: int = 20, seed: int = 0) -> KernelSimilarityResult:
    """Kernel similarity for pairs of models (all pairs if ``n_pairs`` is None or >= the number of
    pairs, else ``n_pairs`` random pairs: the paper's 500 runs), with the random-kernel baseline."""
    models = list(models)
    if len(models) < 2:
        raise ValueError("kernel_similarity needs at least 2 models")
    rng = np.random.default_rng(seed)
    all_pairs = list(itertools.combinations(range(len(models)), 2))
    if n_pairs is None or n_pairs >= len(all_pairs):
        pairs = np.asarray(all_pairs)
    else:
        pairs = np.asarray(all_pairs)[np.sort(rng.choice(len(all_pairs), n_pairs, replace=False))]
    kernels = [{l: layer_kernels(m, l) for l in layers} for m in models]
    sim = np.empty((len(pairs), len(layers)))
    base = np.empty_like(sim)
    cache: dict = {}
    for p, (i, j) in enumerate(pairs):
        for li, l in enumerate(layers):
            a, b = kernels[i][l], kernels[j][l]
            sim[p, li] = matched_cosine(a, b)
            key = (min(len(a), len(b)), max(len(a), len(b)), a.shape[1])
            if key not in cache:
                cache[key] = random_kernel_baseline(*key, n_draws=n_baseline_draws, rng=rng)[0]
            base[p, li] = cache[key]
    return KernelSimilarityResult(layers=np.asarray(layers), pairs=pairs, similarity=sim, baseline=base,
                                  params={"n_pairs": n_pairs, "n_baseline_draws": n_baseline_draws, "seed": seed})


# ---------------------------------------------------------------------------------------------------
# CKA
# ---------------------------------------------------------------------------------------------------

def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def linear_cka(x, y) -> float:
    """Linear CKA of activity x (n, p) and y (n, q) over the same n images (rows). In [0, 1]."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs (n, p) and (n, q) with the same n, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if len(x) < 2:
        raise ValueError("linear_cka needs at least 2 rows (images)")
    if x.shape[1] + y.shape[1] < 2 * len(x):  # feature form is cheaper
        x = x - x.mean(0)
        y = y - y.mean(0)
        num = (y.T @ x).pow(2).sum()
        den = (x.T @ x).norm() * (y.T @ y).norm()
    else:
        k, l = _centered_gram(x), _centered_gram(y)
        num, den = (k * l).sum(), k.norm() * l.norm()
    return float(num / den) if den > 0 else float("nan")


def cka_from_grams(k: torch.Tensor | np.ndarray, l: torch.Tensor | np.ndarray) -> float:
    """Linear CKA from two centred Gram matrices (n, n)."""
    k = torch.as_tensor(k, dtype=torch.float64)
    l = torch.as_tensor(l, dtype=torch.float64)
    den = k.norm() * l.norm()
    return float((k * l).sum() / den) if den > 0 else float("nan")


def _sketch_indices(p: int, d: int, seed: int, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed) * 1000 + layer)
    bins = torch.randint(0, d, (p,), generator=g)
    signs = torch.randint(0, 2, (p,), generator=g).double() * 2 - 1
    return bins.to(device), signs.to(device)


@torch.no_grad()
def layer_grams(model: CompactModel, images: np.ndarray, sketch_dim: int = 4096, seed: int = 0,
                batch_size: int = 32, device=None) -> np.ndarray:
    """Centred Gram matrices of code layers 0-4's activity (count-sketched when wider than
    ``sketch_dim``) over ``images`` (uint8 (n, H, W, 3)) -> float64 (5, n, n)."""
    images = check_images(images, "CKA images")
    check_size(model, images, "CKA images")
    dev = model_device(model, device)
    feats: list[list[torch.Tensor]] = [[] for _ in range(5)]
    sketches: dict[int, tuple] = {}
    with eval_mode(model):
        for s in range(0, len(images), batch_size):
            acts = model.embed(to_model_input(images[s:s + batch_size], model, dev))
            for l, a in enumerate(acts):
                a = a.flatten(1)
                p = a.shape[1]
                if p > sketch_dim:  # sketch in the activations' dtype: a float64 copy of layer 0 is large
                    if l not in sketches:
                        sketches[l] = _sketch_indices(p, sketch_dim, seed, l, a.device)
                    bins, signs = sketches[l]
                    z = torch.zeros(len(a), sketch_dim, dtype=a.dtype, device=a.device)
                    a = z.index_add_(1, bins, a * signs.to(a.dtype))
                feats[l].append(a.double())
    return np.stack([_centered_gram(torch.cat(f)).cpu().numpy() for f in feats])


@dataclass
class CKAResult:
    """layers: int (5,) code layers 0-4, whose activity (post-ReLU output of the RGB conv and of the
    separable layers 1-4) is compared. pairs: int (P, 2). cka: float64 (P, 5) per pair and layer."""

    layers: np.ndarray
    pairs: np.ndarray
    cka: np.ndarray
    n_images: int
    params: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {f"cka_layer{l}": float(np.nanmean(self.cka[:, i])) for i, l in enumerate(self.layers)}


def layer_cka(models: Sequence[CompactModel], images: np.ndarray, n_pairs: int | None = None,
              sketch_dim: int = 4096, seed: int = 0, batch_size: int = 32, device=None) -> CKAResult:
    """Linear CKA per code layer (0-4) between pairs of models on the same images.

    Each model's Gram matrices are computed once (5 n^2 floats per model: n = 1000 images -> 40 MB),
    so many pairs are cheap. n_pairs: None = all pairs, else that many random pairs.
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError("layer_cka needs at least 2 models")
    all_pairs = list(itertools.combinations(range(len(models)), 2))
    rng = np.random.default_rng(seed)
    if n_pairs is None or n_pairs >= len(all_pairs):
        pairs = np.asarray(all_pairs)
    else:
        pairs = np.asarray(all_pairs)[np.sort(rng.choice(len(all_pairs), n_pairs, replace=False))]
    needed = sorted(set(pairs.ravel().tolist()))
    grams = {}
    for i in needed:
        g = torch.as_tensor(layer_grams(models[i], images, sketch_dim, seed, batch_size, device))
        grams[i] = g / g.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, 1, 1)
    cka = np.array([[float((grams[i][l] * grams[j][l]).sum()) for l in range(5)] for i, j in pairs])
    return CKAResult(layers=np.arange(5), pairs=pairs, cka=cka, n_images=len(images),
                     params={"sketch_dim": sketch_dim, "seed": seed, "n_pairs": n_pairs})


# ---------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------

@dataclass
class SignalCorrelationResult:
    """r: float64 (M, M) Pearson r between model outputs over the images (columns = every output of
    every model, in order); mean_r2: mean r^2 over distinct pairs (the paper's 0.11)."""

    r: np.ndarray
    mean_r2: float
    n_images: int

    def summary(self) -> dict[str, float]:
        return {"signal_correlation_mean_r2": self.mean_r2}


@torch.no_grad()
def signal_correlation(models: Sequence[CompactModel], images: np.ndarray, batch_size: int = 64,
                       device=None) -> SignalCorrelationResult:
    """Pearson correlations between the outputs of ``models`` on ``images`` (uint8 (n, H, W, 3))."""
    images = check_images(images, "signal-correlation images")
    cols = []
    for m in models:
        check_size(m, images, "signal-correlation images")
        dev = model_device(m, device)
        with eval_mode(m):
            out = [m(to_model_input(images[s:s + batch_size], m, dev)).double().cpu()
                   for s in range(0, len(images), batch_size)]
        cols.append(torch.cat(out).numpy())
    y = np.concatenate(cols, axis=1)
    if y.shape[1] < 2:
        raise ValueError("signal_correlation needs at least 2 outputs in all")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(y.T)
    iu = np.triu_indices(len(r), 1)
    return SignalCorrelationResult(r=r, mean_r2=float(np.nanmean(r[iu] ** 2)), n_images=len(images))
