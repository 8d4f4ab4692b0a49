"""Maximizing natural ("normal") images: rank an image bank by model output (method.md §7.2).

The bank can be of any size: it arrives as an iterable of shards ``(ids, images)`` or
``(ids, images, kinds)`` (``ImageBank.iter_shards()``), and only the top-k images per output, running
sums and a fixed-size random sample are kept. ``rank_natural_images`` ranks one or more shards;
``merge_topk`` merges partial rankings of the same models over different shards, so a caller (the Ray
layer) can map ``rank_natural_images`` over shards and reduce with ``merge_topk``. ``concat_columns``
joins rankings of different models over the same shards.

Columns: the outputs of all models, concatenated in order (a shared model contributes one column per
neuron), named by ``spec.neuron_ids`` when set.

The random "normal" sample: every image gets a pseudo-random priority from a hash of (seed, image id),
and the ``n_random`` images of lowest priority are kept. This is a uniform random sample without
replacement that does not depend on how the bank was split into shards or in which order they came,
and it is the same images for every model (the paper compares every neuron against normal images).

The paper's metric: %Δr = 100 (mean r_max - mean r_normal) / mean r_normal, means over images, on
spike counts. Compact-model outputs are in standardized teacher units and may be negative, where a
ratio is meaningless: ``percent_delta_r`` returns NaN when the normal mean is <= 0. Map model outputs
to spikes first (``fit_affine`` on recorded responses), or use ``delta_in_sd``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from farm.analysis.common import check_images, model_device, to_model_input
from farm.models.compact import CompactModel


@dataclass(frozen=True)
class NaturalParams:
    """top_k: images kept per column (the paper showed the top images of a 500 k bank).
    n_random: size of the random "normal" sample (baseline of %Δr, estimates of percentiles).
    seed: salt of the sample's hash priorities.
    keep_images: keep the top images' pixels (else only ids and responses). They cost
      columns x top_k x H x W x 3 bytes (219 columns x 100 x 112 px = 820 MB): for many columns turn
      it off and read the few images needed by id (``ImageBank.read``).
    kinds: keep only bank images of these kinds (e.g. ("natural",)); None = all.
    batch_size: images per forward pass.
    """

    top_k: int = 100
    n_random: int = 1000
    seed: int = 0
    keep_images: bool = True
    kinds: tuple[str, ...] | None = None
    batch_size: int = 64

    def __post_init__(self):
        if self.top_k < 1 or self.n_random < 0 or self.batch_size < 1:
            raise ValueError(f"NaturalParams: need top_k >= 1, n_random >= 0, batch_size >= 1; got "
                             f"{self.top_k}, {self.n_random}, {self.batch_size}")
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(str(k) for k in self.kinds))


@dataclass
class NaturalRanking:
    """Top-k images per column and bank statistics, over ``n_images`` images.

    top_ids: str (C, k) ids, best first (k = min(top_k, n_images)).
    top_responses: float64 (C, k), descending along k.
    top_images: uint8 (C, k, H, W, 3), or None when images are not kept.
    response_sum, response_sumsq: float64 (C,) over every image ranked.
    sample_ids: str (S,), the random normal sample (S = min(n_random, n_images)).
    sample_priority: float64 (S,) hash priorities in [0, 1), ascending.
    sample_responses: float64 (C, S).
    columns: name of each column (neuron id, or "model<m>:<output>").
    """

    top_ids: np.ndarray
    top_responses: np.ndarray
    top_images: np.ndarray | None
    n_images: int
    response_sum: np.ndarray
    response_sumsq: np.ndarray
    sample_ids: np.ndarray
    sample_priority: np.ndarray
    sample_responses: np.ndarray
    columns: tuple[str, ...]
    params: NaturalParams = field(default_factory=NaturalParams)

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    def mean(self) -> np.ndarray:
        """Mean response over every ranked image, (C,)."""
        return self.response_sum / max(self.n_images, 1)

    def sd(self) -> np.ndarray:
        """Population SD of the responses over every ranked image, (C,)."""
        m = self.mean()
        return np.sqrt(np.maximum(self.response_sumsq / max(self.n_images, 1) - m * m, 0.0))

    def percent_delta_r(self, k: int | None = None, calibration: tuple[np.ndarray, np.ndarray] | None = None
                        ) -> np.ndarray:
        """Per column %Δr of the top ``k`` (default all kept) against the random normal sample.

        calibration: (slope (C,), intercept (C,)) mapping model output to spike counts first.
        """
        top, normal = self.top_responses[:, :k], self.sample_responses
        if calibration is not None:
            a, b = (np.asarray(c, np.float64).reshape(-1, 1) for c in calibration)
            top, normal = a * top + b, a * normal + b
        return np.array([percent_delta_r(t, n) for t, n in zip(top, normal)])

    def delta_in_sd(self, k: int | None = None) -> np.ndarray:
        """Per column (mean top-k - mean normal sample) / SD of the normal sample."""
        return np.array([delta_in_sd(t, n) for t, n in zip(self.top_responses[:, :k], self.sample_responses)])

    def summary(self) -> dict[str, float]:
        out = {"natural_n_images": float(self.n_images)}
        for c, name in enumerate(self.columns):
            tag = "" if self.n_columns == 1 else f"_{name}"
            out[f"natural_top1{tag}"] = float(self.top_responses[c, 0])
            out[f"natural_topk_mean{tag}"] = float(self.top_responses[c].mean())
            out[f"natural_bank_mean{tag}"] = float(self.mean()[c])
            out[f"natural_delta_sd{tag}"] = float(self.delta_in_sd()[c])
        return out


def percent_delta_r(test_responses, normal_responses) -> float:
    """The paper's %Δr = 100 (mean(test) - mean(normal)) / mean(normal); NaN if mean(normal) <= 0."""
    t = np.asarray(test_responses, np.float64)
    n = np.asarray(normal_responses, np.float64)
    if t.size == 0 or n.size == 0:
        raise ValueError("percent_delta_r needs at least one test and one normal response")
    base = n.mean()
    return float(100.0 * (t.mean() - base) / base) if base > 0 else float("nan")


def delta_in_sd(test_responses, normal_responses) -> float:
    """(mean(test) - mean(normal)) / sd(normal): the response change in units of the normal spread."""
    t = np.asarray(test_responses, np.float64)
    n = np.asarray(normal_responses, np.float64)
    sd = n.std()
    return float((t.mean() - n.mean()) / sd) if sd > 0 else float("nan")


def fit_affine(model_responses, recorded_responses) -> tuple[float, float]:
    """Least-squares (slope, intercept) with recorded ≈ slope * model + intercept (1-D arrays).

    Use it to express a compact model's standardized outputs in spike counts before ``percent_delta_r``.
    """
    x = np.asarray(model_responses, np.float64)
    y = np.asarray(recorded_responses, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"fit_affine needs two 1-D arrays of the same length >= 2, got {x.shape}, {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    return float(slope), float(intercept)


def hash_priority(ids: Sequence, seed: int) -> np.ndarray:
    """Pseudo-random priority in [0, 1) of each image id, a function of (seed, id) only."""
    out = np.empty(len(ids), dtype=np.float64)
    salt = f"{int(seed)}:".encode()
    for i, image_id in enumerate(ids):
        h = hashlib.blake2b(salt + str(image_id).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0 ** 64
    return out


def _column_names(models: Sequence[CompactModel]) -> tuple[str, ...]:
    names = []
    for m_idx, m in enumerate(models):
        ids = m.spec.neuron_ids or tuple(f"model{m_idx}:{o}" for o in range(m.spec.n_outputs))
        names.extend(ids)
    return tuple(names)


def _unpack_shard(shard, kinds: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(shard, (tuple, list)) or len(shard) not in (2, 3):
        raise ValueError("each shard must be (ids, images) or (ids, images, kinds), got "
                         f"{type(shard).__name__}")
    ids = np.asarray(shard[0]).astype(str)
    images = check_images(shard[1], "shard images")
    if len(ids) != len(images):
        raise ValueError(f"shard has {len(ids)} ids for {len(images)} images")
    if kinds is not None:
        if len(shard) != 3:
            raise ValueError("NaturalParams.kinds is set but the shards carry no kinds (ids, images)")
        keep = np.isin(np.asarray(shard[2]).astype(str), kinds)
        ids, images = ids[keep], images[keep]
    return ids, images


@torch.no_grad()
def _responses(models: Sequence[CompactModel], images: np.ndarray, batch_size: int, device) -> np.ndarray:
    out = np.empty((len(images), sum(m.spec.n_outputs for m in models)), dtype=np.float64)
    for s in range(0, len(images), batch_size):
        cols = []
        for m in models:
            x = to_model_input(images[s:s + batch_size], m, model_device(m, device))
            cols.append(m(x).double().cpu())
        out[s:s + batch_size] = torch.cat(cols, dim=1).numpy()
    return out


def _shard_ranking(ids, images, responses, columns, params: NaturalParams) -> NaturalRanking:
    n, c = responses.shape
    k = min(params.top_k, n)
    order = np.argsort(-responses, axis=0, kind="stable")[:k].T  # (C, k)
    top_resp = np.take_along_axis(responses.T, order, axis=1)
    prio = hash_priority(ids, params.seed)
    s = np.argsort(prio, kind="stable")[:min(params.n_random, n)]
    return NaturalRanking(
        top_ids=ids[order], top_responses=top_resp,
        top_images=images[order] if params.keep_images else None,
        n_images=n, response_sum=responses.sum(0), response_sumsq=(responses ** 2).sum(0),
        sample_ids=ids[s], sample_priority=prio[s], sample_responses=responses[s].T.copy(),
        columns=columns, params=params)


def _empty_ranking(columns, params: NaturalParams, image_shape) -> NaturalRanking:
    c = len(columns)
    return NaturalRanking(
        top_ids=np.empty((c, 0), dtype=str), top_responses=np.empty((c, 0)),
        top_images=np.empty((c, 0, *image_shape), np.uint8) if params.keep_images else None,
        n_images=0, response_sum=np.zeros(c), response_sumsq=np.zeros(c),
        sample_ids=np.empty(0, dtype=str), sample_priority=np.empty(0), sample_responses=np.empty((c, 0)),
        columns=columns, params=params)


def rank_natural_images(models: CompactModel | Sequence[CompactModel], shards: Iterable,
                        top_k: int | None = None, params: NaturalParams | None = None, device=None,
                        progress: Callable[[int], None] | None = None) -> NaturalRanking:
    """Rank every image of ``shards`` by each output of ``models``; keep the top ``top_k`` per output.

    models: one CompactModel or several (same input size); columns = their outputs concatenated.
    shards: iterable of (ids, uint8 images (n, H, W, 3)) or (ids, images, kinds).
    top_k: overrides ``params.top_k``.
    device: where to run (None: each model's own device).
    progress: called with the number of images ranked so far after every shard.
    """
    if isinstance(models, CompactModel):
        models = [models]
    models = list(models)
    if not models:
        raise ValueError("rank_natural_images needs at least one model")
    sizes = {m.spec.image_size for m in models}
    if len(sizes) != 1:
        raise ValueError(f"rank_natural_images: models take different image sizes {sorted(sizes)}")
    size = sizes.pop()
    params = params or NaturalParams()
    if top_k is not None:
        params = replace(params, top_k=int(top_k))
    columns = _column_names(models)
    ranking = _empty_ranking(columns, params, (size, size, 3))
    states = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        for shard in shards:
            ids, images = _unpack_shard(shard, params.kinds)
            if len(images) == 0:
                continue
            if images.shape[1:3] != (size, size):
                raise ValueError(f"shard images are {images.shape[1]}x{images.shape[2]} px but the models "
                                 f"take {size}x{size}")
            resp = _responses(models, images, params.batch_size, device)
            ranking = merge_topk([ranking, _shard_ranking(ids, images, resp, columns, params)])
            if progress is not None:
                progress(ranking.n_images)
    finally:
        for m, t in zip(models, states):
            m.train(t)
    return ranking


def merge_topk(parts: Sequence[NaturalRanking]) -> NaturalRanking:
    """Merge rankings of the same columns over disjoint sets of images (e.g. shards of a bank).

    The result equals ranking all their images at once (ties broken by part order).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_topk needs at least one partial ranking")
    first = parts[0]
    for p in parts[1:]:
        if p.columns != first.columns:
            raise ValueError("merge_topk: partial rankings have different columns (models); "
                             "use concat_columns for different models over the same images")
        if (p.params.top_k, p.params.n_random, p.params.seed, p.params.keep_images) != \
                (first.params.top_k, first.params.n_random, first.params.seed, first.params.keep_images):
            raise ValueError("merge_topk: partial rankings were made with different top_k / n_random / "
                             "seed / keep_images")
    params = first.params
    ids = np.concatenate([p.top_ids for p in parts], axis=1)
    resp = np.concatenate([p.top_responses for p in parts], axis=1)
    k = min(params.top_k, resp.shape[1])
    order = np.argsort(-resp, axis=1, kind="stable")[:, :k]
    images = None
    if params.keep_images:
        all_images = np.concatenate([p.top_images for p in parts], axis=1)
        images = np.take_along_axis(all_images, order[:, :, None, None, None], axis=1)
    s_ids = np.concatenate([p.sample_ids for p in parts])
    s_prio = np.concatenate([p.sample_priority for p in parts])
    s_resp = np.concatenate([p.sample_responses for p in parts], axis=1)
    s = np.argsort(s_prio, kind="stable")[:params.n_random]
    return NaturalRanking(
        top_ids=np.take_along_axis(ids, order, axis=1), top_responses=np.take_along_axis(resp, order, axis=1),
        top_images=images, n_images=sum(p.n_images for p in parts),
        response_sum=sum(p.response_sum for p in parts), response_sumsq=sum(p.response_sumsq for p in parts),
        sample_ids=s_ids[s], sample_priority=s_prio[s], sample_responses=s_resp[:, s],
        columns=first.columns, params=params)


def concat_columns(parts: Sequence[NaturalRanking]) -> NaturalRanking:
    """Join rankings of different models over the same images into one ranking with all columns."""
    parts = list(parts)
    if not parts:
        raise ValueError("concat_columns needs at least one ranking")
    first = parts[0]
    for p in parts[1:]:
        if p.n_images != first.n_images or not np.array_equal(p.sample_ids, first.sample_ids):
            raise ValueError("concat_columns: rankings are over different images")
        if p.params.top_k != first.params.top_k or p.params.keep_images != first.params.keep_images:
            raise ValueError("concat_columns: rankings were made with different top_k / keep_images")
    return NaturalRanking(
        top_ids=np.concatenate([p.top_ids for p in parts]),
        top_responses=np.concatenate([p.top_responses for p in parts]),
        top_images=np.concatenate([p.top_images for p in parts]) if first.params.keep_images else None,
        n_images=first.n_images,
        response_sum=np.concatenate([p.response_sum for p in parts]),
        response_sumsq=np.concatenate([p.response_sumsq for p in parts]),
        sample_ids=first.sample_ids, sample_priority=first.sample_priority,
        sample_responses=np.concatenate([p.sample_responses for p in parts]),
        columns=tuple(c for p in parts for c in p.columns), params=first.params)


def iter_array_shards(images: np.ndarray, shard_size: int = 10_000, ids: Sequence | None = None):
    """Shards (ids, images) of an in-memory uint8 image array; ids default to "0", "1", ..."""
    images = check_images(images, "images")
    ids = np.arange(len(images)).astype(str) if ids is None else np.asarray(ids).astype(str)
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids for {len(images)} images")
    for s in range(0, len(images), shard_size):
        yield ids[s:s + shard_size], images[s:s + shard_size]
