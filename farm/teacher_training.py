"""Training the deep-ensemble teacher across sessions (``farm.teacher.EnsembleTeacher``).

    cfg = TeacherConfig.load("configs/teacher_demo.yaml")
    teacher = train_teacher(train_sessions, validation_session, cfg)   # method.md §2.4
    teacher = fit_session_readout(teacher, test_session, half="first")  # §1.6
    evaluate_teacher(teacher, test_session, half="second")              # median raw R² (+ r²_ER)
    teacher.predict(images)                                             # (N, neurons) float32

Training (§2.4): K members on frozen backbone features, each trained on one session after another
with a freshly reset factorized readout (§2.3), SGD with momentum and element-wise gradient clipping,
targets z-scored per neuron per session, passes per session visit growing with the epoch, learning
rate decayed per epoch, session order shuffled per epoch. After every session visit the members are
scored on the validation session by the K-fold cross-validated ridge ensemble (§2.5), median r²_ER
over neurons (raw R² when the session has averages only); the best members are kept.

Differences from the paper, all deliberate:
  - the trunk is torchvision's ResNet50 (see ``farm.models.ensemble``), pretrained only when a local
    weights file is given;
  - each session visit gets its own readout optimizer (the reset readout starts without momentum);
  - the loss is the squared error summed over the session's neurons divided by ``readout_units``
    (200), which equals the paper's MSE over 200 zero-padded outputs without computing the padding;
  - the validation ridge penalty is chosen from a relative grid by the same K-fold CV (``"cv"``),
    since the reference default (``"default"``, still available) does not suit scaled-down members.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from farm.files import write_text_atomic
from farm import metrics
from farm.data.sessions import Session
from farm.models.ensemble import (
    FactorizedReadout,
    FeatureCache,
    Member,
    MemberSpec,
    build_backbone,
    build_member,
    readout_init_weights,
)

log = logging.getLogger(__name__)

from farm.teacher import Callback, EnsembleTeacher, check_session_images, resolve_device, torch_threads, zscore
from farm.teacher_config import TeacherConfig
from farm.teacher_readout import evaluate_teacher, fit_session_readout, validation_score


# ------------------------------------------------------------------------------------------------
# training


def _train_index(session: Session, config: TeacherConfig) -> np.ndarray:
    """Training images of a session: ``config.train_images`` (0-based half-open ranges), else the
    session's ``metadata["ensemble_images"]`` (1-based inclusive, as the V4 importer records the
    paper's choice, e.g. 1-600 and 901-1200 for 1909xx), else all."""
    ranges = config.train_images.get(session.session_id)
    if not ranges and session.metadata.get("ensemble_images"):
        ranges = [[int(a) - 1, int(b)] for a, b in session.metadata["ensemble_images"]]
    if not ranges:
        return np.arange(session.n_images)
    idx = np.concatenate([np.arange(a, min(b, session.n_images)) for a, b in ranges])
    if len(idx) == 0:
        raise ValueError(f"TeacherConfig.train_images[{session.session_id!r}] selects no image of its "
                         f"{session.n_images}")
    return idx


def train_teacher(train_sessions: Sequence[Session], validation_session: Session | None,
                  config: TeacherConfig | dict, callback: Callback | None = None,
                  cache: FeatureCache | None = None) -> EnsembleTeacher:
    """Train the ensemble across sessions (method.md §2.4); see the module docstring.

    train_sessions: sessions with images (each z-scored per neuron over its training images,
        ``config.train_images`` selecting them). validation_session: early-stopping session (None:
        no early stopping, the last members are kept).
    callback(event, info): "features" (per session: shapes, seconds), "session" (after each session
        visit: epoch, session id, passes, lr, mean training loss, validation score, best so far),
        "epoch", "done". Exceptions raised by the callback propagate.
    Returns the best members with a ridge readout for the validation session (fit on all its images)
    when there is one, else without a readout. ``teacher.info["history"]`` holds the visit records.
    """
    config = TeacherConfig.load(config)
    if not train_sessions:
        raise ValueError("train_teacher: no training sessions")
    for s in [*train_sessions, *([validation_session] if validation_session is not None else [])]:
        check_session_images(s)
    emit = callback or (lambda event, info: None)
    device = resolve_device(config.device)
    cache = cache or FeatureCache(config.feature_cache_dir, config.feature_batch_size, device)
    t_start = time.time()
    with torch_threads(config.threads):
        backbone = build_backbone(config.backbone_spec()).to(device)
        # Features once per session (frozen backbone), kept on the CPU; batches go to the device.
        data = []
        for s in train_sessions:
            t0 = time.time()
            idx = _train_index(s, config)
            feats = cache.get(backbone, s.session_id, s.images if len(idx) == s.n_images else s.images[idx])
            z, _, _ = zscore(s.mean_responses()[:, idx].T, f"training session {s.session_id}")
            if s.n_neurons > config.readout_units:
                raise ValueError(f"training session {s.session_id} has {s.n_neurons} neurons, more than "
                                 f"TeacherConfig.readout_units={config.readout_units}")
            data.append((s.session_id, feats, z.astype(np.float32)))
            emit("features", {"session": s.session_id, "n_images": int(len(idx)),
                              "shape": list(feats.shape), "seconds": time.time() - t0})
        val_feats = None
        if validation_session is not None:
            t0 = time.time()
            val_feats = cache.get(backbone, validation_session.session_id, validation_session.images)
            emit("features", {"session": validation_session.session_id, "n_images": validation_session.n_images,
                              "shape": list(val_feats.shape), "seconds": time.time() - t0})
        c_feat, h_feat, _ = backbone.out_shape
        mspec = config.member_spec(c_feat)
        side = MemberSpec.embedding_side(h_feat)
        members = [build_member(mspec, seed=config.seed + k).to(device) for k in range(config.n_members)]
        teacher = EnsembleTeacher(backbone, members, None, device)
        gens = [torch.Generator().manual_seed(config.seed + k) for k in range(config.n_members)]
        readout_inits = [readout_init_weights(mspec.width, side, config.readout_units, g) for g in gens]
        order_rng = np.random.default_rng(config.seed)

        history: list[dict] = []
        best_score, best_state, best_where = -math.inf, None, None
        for epoch in range(config.epochs):
            lr = config.lr * config.lr_decay ** epoch
            passes = config.passes[epoch]
            # Re-created each epoch as in the reference, which also resets the momentum buffers.
            member_opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=config.momentum) for m in members]
            session_order = order_rng.permutation(len(data))
            for visit, si in enumerate(session_order):
                sid, feats, z = data[si]
                t0 = time.time()
                losses = []
                for k, member in enumerate(members):
                    losses.append(_train_member_on_session(
                        member, member_opts[k], readout_inits[k], feats, z, passes, lr, config, gens[k], device))
                record = {"epoch": epoch, "visit": visit, "session": sid, "passes": passes, "lr": lr,
                          "train_loss": float(np.mean(losses)), "train_seconds": time.time() - t0}
                last_visit = visit == len(session_order) - 1
                if val_feats is not None and (config.validate_every == "session" or last_visit):
                    t1 = time.time()
                    v = validation_score(teacher, val_feats, validation_session, config.validation_alpha,
                                         config.validation_folds)
                    improved = v["score"] > best_score
                    if improved:
                        best_score = v["score"]
                        best_state = [copy.deepcopy(m.state_dict()) for m in members]
                        best_where = {"epoch": epoch, "visit": visit, "session": sid}
                    record.update({"val_score": v["score"], "val_metric": v["metric"], "val_alpha": v["alpha"],
                                   "best_score": best_score, "improved": improved,
                                   "val_seconds": time.time() - t1})
                history.append(record)
                val = record.get("val_score")
                log.info("teacher epoch %d, session %s (visit %d): train loss %.4f%s, %.0f s", epoch, sid, visit,
                         record["train_loss"], "" if val is None else f", validation {val:.3f}",
                         time.time() - t_start)
                emit("session", dict(record))
            emit("epoch", {"epoch": epoch, "lr": lr, "passes": passes, "best_score": best_score,
                           "val_score": history[-1].get("val_score"), "elapsed_s": time.time() - t_start})
        if best_state is not None:
            for m, st in zip(members, best_state):
                m.load_state_dict(st)
        for m in members:
            m.eval()
        teacher.info = {
            "config": config.to_dict(),
            "train_sessions": [s.session_id for s in train_sessions],
            "validation_session": validation_session.session_id if validation_session is not None else None,
            "best_validation_score": best_score if best_state is not None else None,
            "best_at": best_where,
            "history": history,
            "train_seconds": time.time() - t_start,
            "pretrained": backbone.pretrained,
        }
        if validation_session is not None:
            teacher = fit_session_readout(teacher, validation_session, "all", "ridge", config.ridge_alpha,
                                          config.output_units, cache=cache)
        emit("done", {"best_score": teacher.info["best_validation_score"], "best_at": best_where,
                      "train_seconds": teacher.info["train_seconds"], "pretrained": backbone.pretrained})
    return teacher


def _train_member_on_session(member: Member, opt: torch.optim.Optimizer, readout_init, feats: np.ndarray,
                             z: np.ndarray, passes: int, lr: float, config: TeacherConfig,
                             gen: torch.Generator, device: torch.device) -> float:
    """One session visit of one member: reset the readout (§2.3), ``passes`` shuffled passes of
    SGD on MSE, clipping each gradient element to +-clip_value. Returns the last pass's mean loss."""
    n_img, n_neurons = z.shape
    readout = FactorizedReadout.reset_from(readout_init[0], readout_init[1], n_neurons, gen,
                                           config.readout_reset_scale).to(device)
    readout_opt = torch.optim.SGD(readout.parameters(), lr=lr, momentum=config.momentum)
    params = list(member.parameters()) + list(readout.parameters())
    member.train()
    z_t = torch.from_numpy(z)
    last = []
    for _ in range(passes):
        last = []
        perm = torch.randperm(n_img, generator=gen).numpy()
        for s in range(0, n_img, config.batch_size):
            b = np.sort(perm[s:s + config.batch_size])
            x = torch.from_numpy(feats[b]).to(device)
            y = z_t[b].to(device)
            pred = readout(member(x))
            # Squared error summed over the session's neurons / readout_units = the paper's MSE
            # over 200 outputs whose padded units are exactly 0.
            loss = ((pred - y) ** 2).sum(dim=1).mean() / config.readout_units
            opt.zero_grad(set_to_none=True)
            readout_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, config.clip_value)
            opt.step()
            readout_opt.step()
            last.append(float(loss.detach()) * config.readout_units / n_neurons)
    member.eval()
    return float(np.mean(last)) if last else float("nan")


# ------------------------------------------------------------------------------------------------
# the end-to-end function the CLI calls


def _load_sessions(config: TeacherConfig, data_dir: str | Path | None) -> tuple[list[Session], Any]:
    """Sessions and the simulated ground truth (a Teacher of true rates, or None) from ``data_dir``:
    a simulated population folder (``population.json``), a V4 release folder
    (``responses_repeat_averaged/``) or a folder of Parquet sessions; with no folder, a population
    simulated from ``config.simulation``."""
    data_dir = data_dir if data_dir is not None else config.data_dir
    if data_dir is None:
        if config.simulation is None:
            raise ValueError("run_teacher_training: no data folder given and the config has no `simulation`")
        from farm.data.simulate import SimulationConfig, simulate_population

        pop = simulate_population(SimulationConfig.from_dict(dict(config.simulation)))
        return list(pop.sessions), pop.ground_truth
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir}: not found")
    if (data_dir / "population.json").is_file():
        from farm.data.simulate import load_population

        pop = load_population(data_dir)
        return list(pop.sessions), pop.ground_truth
    if (data_dir / "responses_repeat_averaged").is_dir():
        from farm.data.v4release import load_v4_session

        wanted = [*config.train_sessions, config.validation_session, config.test_session]
        wanted = [w for w in dict.fromkeys(wanted) if w is not None]
        if not wanted:
            raise ValueError(f"{data_dir} is a V4 release folder: the config must name train_sessions, "
                             f"validation_session and test_session")
        return [load_v4_session(data_dir, sid) for sid in wanted], None
    from farm.data.sessions import read_sessions

    return read_sessions(data_dir), None


def _pick(sessions: list[Session], config: TeacherConfig) -> tuple[list[Session], Session | None, Session | None]:
    by_id = {s.session_id: s for s in sessions}

    def get(sid, what):
        if sid not in by_id:
            raise ValueError(f"TeacherConfig.{what}: session {sid!r} not in the data ({sorted(by_id)})")
        return by_id[sid]

    train = [get(s, "train_sessions") for s in config.train_sessions] if config.train_sessions else \
        [s for s in sessions if s.role == "train" and s.images_available]
    val = get(config.validation_session, "validation_session") if config.validation_session else \
        next((s for s in sessions if s.role == "validation"), None)
    test = get(config.test_session, "test_session") if config.test_session else \
        next((s for s in sessions if s.role == "test"), None)
    return train, val, test


def _ground_truth_correlation(ground_truth, teacher: EnsembleTeacher, images: np.ndarray) -> dict | None:
    """Per-neuron Pearson r between the teacher and the simulated true rates on ``images``."""
    if ground_truth is None:
        return None
    gt_teacher = ground_truth
    gt_cols = {nid: j for j, nid in enumerate(gt_teacher.neuron_ids)}
    shared = [nid for nid in teacher.neuron_ids if nid in gt_cols]
    if not shared:
        return None
    truth = gt_teacher.predict(images)[:, [gt_cols[n] for n in shared]]
    cols = {nid: j for j, nid in enumerate(teacher.neuron_ids)}
    pred = teacher.predict(images)[:, [cols[n] for n in shared]]
    r = metrics.pearson_r(pred.T, truth.T)
    return {"n_neurons": len(shared), "median_r": float(np.nanmedian(r)), "r": r.tolist()}


#: TeacherConfig fields that do not change what is trained (where and how fast it runs).
RUNTIME_FIELDS = ("device", "threads", "feature_batch_size", "feature_cache_dir", "data_dir")


def training_stamp(config: TeacherConfig, sessions: Sequence[Session]) -> dict:
    """What a trained teacher was made from, for the report: the training config (runtime fields
    left out) and every session it could see (id -> role, neurons, images). A job that finds a
    teacher in its folder compares this stamp with its own before reusing it."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    data = {s.session_id: [s.role, s.n_neurons, s.n_images] for s in sessions}
    return json.loads(json.dumps({"config": cfg, "sessions": data}, sort_keys=True, default=str))


def run_teacher_training(config: "str | Path | dict | TeacherConfig", data_dir: str | Path | None,
                         out_dir: str | Path, callback: Callback | None = None) -> tuple[EnsembleTeacher, dict]:
    """Train a teacher, fit the test session's readout on its first half, score its second half.

    data_dir: V4 release folder, Parquet sessions folder, or None (``config.data_dir``, else simulate
    ``config.simulation``). Writes ``out_dir/teacher/`` (the teacher with the test-session readout)
    and ``out_dir/report.json``. The report has the teacher id, whether the backbone was pretrained,
    the best validation score, the test session's median raw R² on its second half (and r²_ER when it
    has repeats), and for simulated data the median Pearson r against the true rates on those images.
    """
    config = TeacherConfig.load(config)
    out_dir = Path(out_dir)
    t0 = time.time()
    with torch_threads(config.threads):
        sessions, ground_truth = _load_sessions(config, data_dir)
        train, val, test = _pick(sessions, config)
        cache = FeatureCache(config.feature_cache_dir, config.feature_batch_size, resolve_device(config.device))
        teacher = train_teacher(train, val, config, callback, cache)
        report: dict = {
            "trained_on": training_stamp(config, sessions),
            "pretrained": teacher.pretrained,
            "backbone": teacher.backbone.spec.to_dict(),
            "train_sessions": [s.session_id for s in train],
            "validation_session": val.session_id if val is not None else None,
            "best_validation_score": teacher.info.get("best_validation_score"),
            "best_at": teacher.info.get("best_at"),
            "validation_metric": teacher.info["history"][-1].get("val_metric") if teacher.info["history"] else None,
            "train_seconds": teacher.info.get("train_seconds"),
        }
        if test is not None:
            teacher = fit_session_readout(teacher, test, "first", config.readout_kind, config.ridge_alpha,
                                          config.output_units, config.factorized_epochs, config.factorized_lr,
                                          cache=cache)
            ev = evaluate_teacher(teacher, test, "second", cache=cache)
            report["test"] = ev
            report["test_session"] = test.session_id
            report["test_median_r2_raw"] = ev["median_r2_raw"]
            if "median_r2_er" in ev:
                report["test_median_r2_er"] = ev["median_r2_er"]
            gt = _ground_truth_correlation(ground_truth, teacher, test.halves()[1].images)
            if gt is not None:
                report["ground_truth"] = gt
                report["ground_truth_median_r"] = gt["median_r"]
            if callback is not None:
                callback("test", {k: v for k, v in report.items() if k.startswith(("test_", "ground_truth_"))})
        report["teacher_id"] = teacher.teacher_id
        report["total_seconds"] = time.time() - t0
        teacher.save(out_dir / "teacher")
        write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    return teacher, report

