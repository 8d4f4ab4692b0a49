"""Fitting and scoring the teacher's readouts on a session (method.md §1.6, §2.5): the K-fold
cross-validated ridge ensemble over member embeddings.

    teacher = fit_session_readout(teacher, test_session, half="first")  # §1.6
    evaluate_teacher(teacher, test_session, half="second")              # median raw R² (+ r²_ER)
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Sequence

import numpy as np
import torch

from farm import metrics
from farm.data.sessions import Session
from farm.models.ensemble import (
    ALPHA_GRID,
    FactorizedReadout,
    FeatureCache,
    ReadoutHead,
    RidgeSolver,
    blas_threads,
    choose_ridge_alpha,
    median_r2_columns,
    resolve_alpha,
    ridge_cv_predictions,
)

log = logging.getLogger(__name__)

from farm.teacher import EnsembleTeacher, check_session_images, half_index, zscore


class _Embeddings(Sequence):
    """Flattened member embeddings (n, D) of fixed features, computed on demand (one member at a time)."""

    def __init__(self, teacher: EnsembleTeacher, features: np.ndarray, index: np.ndarray | None = None):
        self.teacher, self.features, self.index = teacher, features, index

    def __len__(self) -> int:
        return self.teacher.n_members

    def __getitem__(self, k: int) -> np.ndarray:
        e = self.teacher.embed(self.features, k)
        e = e.reshape(len(e), -1)
        return e if self.index is None else e[self.index]


# ------------------------------------------------------------------------------------------------
# readouts for a session


def _ridge_alpha_spec(alpha) -> Any:
    """Config value -> what ``resolve_alpha`` takes (None means "cv")."""
    if alpha is None or alpha == "cv":
        return "cv"
    if alpha == "default" or (isinstance(alpha, tuple) and alpha[0] == "relative"):
        return alpha
    if isinstance(alpha, (int, float)) and alpha > 0:
        return float(alpha)
    raise ValueError(f"ridge alpha must be None, 'cv', 'default' or a positive number, got {alpha!r}")


def fit_session_readout(teacher: EnsembleTeacher, session: Session, half: str = "first",
                        kind: str = "ridge", alpha=None, output_units: str = "standardized",
                        factorized_epochs: int = 50, factorized_lr: float = 1e-3,
                        cache: FeatureCache | None = None, seed: int = 314159) -> EnsembleTeacher:
    """Fit a readout from the ensemble's embeddings to ``session``'s neurons (method.md §1.6, §2.5).

    Fits on the repeat-averaged responses of the images in ``half`` ("first", as the paper does for
    test sessions; "second"; "all"), z-scored per neuron.
    kind "ridge": one ridge regression per member on its flattened embedding; ``alpha`` None/"cv"
        picks a penalty by 8-fold CV on the fitting images, "default" is the reference rule, a number
        is used as is.
    kind "factorized": per member, mixing (1x1) x spatial map per neuron + bias, initialized from the
        rank-1 SVD of each neuron's ridge weights and trained with Adam (L2 1e-4 on mixing, 1e-2 on
        spatial, as §2.5) for up to ``factorized_epochs``, keeping the epoch with the best median R²
        on a held-out eighth of the fitting images. (No BN between the stages, unlike the reference.)
    Returns a teacher sharing ``teacher``'s backbone and members whose ``neuron_ids`` are the session's.
    """
    check_session_images(session)
    idx = half_index(session, half)
    if len(idx) < 16:
        raise ValueError(f"session {session.session_id}: {len(idx)} images in half {half!r}; need >= 16")
    images = session.images[idx]
    feats = cache.get(teacher.backbone, f"{session.session_id}-{half}", images) if cache else \
        teacher.features(images)
    y, mean, sd = zscore(session.mean_responses()[:, idx].T, f"session {session.session_id}")
    c, h, w = teacher.embedding_shape
    head = ReadoutHead(kind, teacher.n_members, session.n_neurons, c, h, session.neuron_ids, output_units)
    xs = _Embeddings(teacher, feats)
    alpha = _ridge_alpha_spec(alpha)
    if alpha == "cv":
        alpha, score = choose_ridge_alpha(xs, y, seed=seed)
        log.info("session %s readout: ridge alpha %s x scale (CV median R2 %.3f)", session.session_id, alpha[1], score)
    with torch.no_grad():
        head.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        head.target_std.copy_(torch.as_tensor(sd, dtype=torch.float32))
    for k in range(teacher.n_members):
        x = xs[k]
        if kind == "ridge":
            solver = RidgeSolver(x, y)
            wk, bk = solver.coef(resolve_alpha(solver, x, alpha))
            with torch.no_grad():
                head.weight[k].copy_(torch.as_tensor(wk, dtype=torch.float32))
                head.bias[k].copy_(torch.as_tensor(bk, dtype=torch.float32))
        else:
            _fit_factorized_member(head, k, x.reshape(len(x), c, h, w), y, alpha,
                                   factorized_epochs, factorized_lr, seed + k)
    info = dict(teacher.info)
    info["readout"] = {"session": session.session_id, "half": half, "kind": kind, "n_images": int(len(idx)),
                       "alpha": list(alpha) if isinstance(alpha, tuple) else alpha}
    out = teacher.with_head(head.to(teacher.device))
    out.info = info
    return out


def _fit_factorized_member(head: ReadoutHead, k: int, emb: np.ndarray, y: np.ndarray, alpha,
                           epochs: int, lr: float, seed: int) -> None:
    """Fill member ``k`` of a factorized ``head`` from embeddings (n, C, h, w) and z-scored y (n, k)."""
    n, c, h, w = emb.shape
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(n // 8, 2)
    hold, train = order[:n_hold], order[n_hold:]
    x_flat = emb.reshape(n, -1)
    solver = RidgeSolver(x_flat[train], y[train])
    wk, bk = solver.coef(resolve_alpha(solver, x_flat[train], alpha))
    mixing = np.empty((y.shape[1], c))
    spatial = np.empty((y.shape[1], h, w))
    with blas_threads(1):
        for j in range(y.shape[1]):
            u, s, vt = np.linalg.svd(wk[:, j].reshape(c, h * w), full_matrices=False)
            mixing[j] = u[:, 0] * np.sqrt(s[0])
            spatial[j] = (vt[0] * np.sqrt(s[0])).reshape(h, w)
    ro = FactorizedReadout(y.shape[1], c, h)
    with torch.no_grad():
        ro.mixing.copy_(torch.as_tensor(mixing, dtype=torch.float32))
        ro.spatial.copy_(torch.as_tensor(spatial, dtype=torch.float32))
        ro.spatial_bias.copy_(torch.as_tensor(bk, dtype=torch.float32))
    xt = torch.as_tensor(emb, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.Adam(ro.parameters(), lr=lr, eps=1e-7)
    gen = torch.Generator().manual_seed(seed)
    train_t, hold_t = torch.as_tensor(train), torch.as_tensor(hold)

    def held_out_score() -> float:
        with torch.no_grad():
            p = ro(xt[hold_t]).numpy()
        return median_r2_columns(y[hold], p)

    best, best_state = held_out_score(), copy.deepcopy(ro.state_dict())
    for _ in range(int(epochs)):
        perm = train_t[torch.randperm(len(train_t), generator=gen)]
        for s in range(0, len(perm), 64):
            b = perm[s:s + 64]
            loss = ((ro(xt[b]) - yt[b]) ** 2).mean() + 1e-4 * ro.mixing.pow(2).sum() + 1e-2 * ro.spatial.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(ro.parameters(), 0.5)
            opt.step()
        score = held_out_score()
        if score > best:
            best, best_state = score, copy.deepcopy(ro.state_dict())
    ro.load_state_dict(best_state)
    with torch.no_grad():
        head.mixing[k].copy_(ro.mixing)
        head.mixing_bias[k].copy_(ro.mixing_bias)
        head.spatial[k].copy_(ro.spatial)
        head.bias[k].copy_(ro.spatial_bias)


def evaluate_teacher(teacher: EnsembleTeacher, session: Session, half: str = "second",
                     cache: FeatureCache | None = None) -> dict:
    """Scores of the teacher on ``session``'s images in ``half`` (method.md §1.6, §6).

    The teacher must predict the session's neurons (matched by id). Returns a dict with
    ``median_r2_raw`` (squared Pearson r with the repeat-averaged responses), ``median_r``,
    ``median_r2_er`` (only when the session has raw repeats) and the per-neuron lists.
    """
    check_session_images(session)
    cols = {nid: j for j, nid in enumerate(teacher.neuron_ids)}
    missing = [nid for nid in session.neuron_ids if nid not in cols]
    if missing:
        raise ValueError(f"teacher does not predict {len(missing)} neuron(s) of session "
                         f"{session.session_id} (e.g. {missing[:3]}); fit a readout for it first")
    idx = half_index(session, half)
    images = session.images[idx]
    feats = cache.get(teacher.backbone, f"{session.session_id}-{half}", images) if cache else \
        teacher.features(images)
    pred = teacher.predict_features(feats)[:, [cols[nid] for nid in session.neuron_ids]]
    responses = session.responses[:, idx]
    scores = metrics.evaluate_predictions(responses if session.has_repeats else session.mean_responses()[:, idx],
                                          pred.T.astype(np.float64), session.has_repeats)
    out = {"session": session.session_id, "half": half, "n_neurons": session.n_neurons,
           "n_images": int(len(idx)), "has_repeats": bool(session.has_repeats),
           "median_r2_raw": float(np.nanmedian(scores["r2_raw"])),
           "median_r": float(np.nanmedian(scores["r"])),
           "r2_raw": scores["r2_raw"].tolist(), "r": scores["r"].tolist()}
    if "r2_er" in scores:
        out["median_r2_er"] = float(np.nanmedian(scores["r2_er"]))
        out["r2_er"] = scores["r2_er"].tolist()
    return out


def validation_score(teacher: EnsembleTeacher, features: np.ndarray, session: Session, alpha="cv",
                     n_folds: int = 8) -> dict:
    """K-fold ridge-ensemble score of the members on a validation session (§2.4-§2.5).

    Median over neurons of r²_ER of the out-of-fold member-averaged predictions when the session has
    raw repeats, else of raw R². With alpha "cv" the best penalty of the relative grid is reported.
    Returns {"score", "metric", "alpha"}.
    """
    y_mean = session.mean_responses().T  # (images, neurons)
    y, _, _ = zscore(y_mean, f"validation session {session.session_id}")
    if alpha == "cv":
        alphas = [("relative", g) for g in ALPHA_GRID]
    else:
        alphas = [_ridge_alpha_spec(alpha)]
    index, preds = ridge_cv_predictions(_Embeddings(teacher, features), y, alphas, n_folds)
    metric = "r2_er" if session.has_repeats else "r2_raw"
    best = (-math.inf, None)
    for a, p in zip(alphas, preds):
        if session.has_repeats:
            per_neuron = metrics.r2_er(session.responses[:, index], p.T)
        else:
            per_neuron = metrics.r2_raw(y_mean[index].T, p.T)
        s = float(np.nanmedian(per_neuron)) if np.isfinite(per_neuron).any() else -math.inf
        if s > best[0]:
            best = (s, a)
    a = best[1]
    return {"score": best[0], "metric": metric, "alpha": list(a) if isinstance(a, tuple) else a}

