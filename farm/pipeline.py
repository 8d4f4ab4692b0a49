"""The jobs: data -> teacher -> image bank -> teacher responses -> compress (Ray) / sweep (Tune).

Every stage writes its output under the job's ``out_dir`` and reuses it on the next run (the
simulated population, the trained teacher, the bank, the teacher-response table, distilled models),
so a re-run after a crash only redoes what is missing. MLflow and Ray are touched only through
``farm.tracking``, ``farm.fanout``, ``farm.sweep`` (and ``farm.submit`` for Ray Jobs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from farm.files import exclusive, write_text_atomic
from farm.config import JobConfig, load_job_config, read_yaml, resolve_config_path
from farm.fanout import JobResult, init_job_ray, run_neurons, stop_ray
from farm.neuron_runs import NeuronInputs
from farm.selection import neuron_slug, neuron_sort_key, parse_neuron_selection
from farm.task_env import release_freed_memory
from farm.teacher_sources import PUBLISHED_KINDS, published_teacher
from farm.tracking import Tracker, ui_command, ui_url

log = logging.getLogger(__name__)


def code_version() -> str:
    """The git commit of the farm checkout (plus "-dirty"), or the package version."""
    import farm

    here = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return farm.__version__


def _changed(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between a cache's recorded config and the job's (sorted)."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _there_asked(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} asked" for k in _changed(old, new))


def check_input_paths(cfg: JobConfig) -> None:
    """Every input file or folder the config names exists, before any work (not at load: a config
    submitted to a cluster is loaded where head-only paths may not exist). FileNotFoundError naming
    the key."""
    named = {}
    if cfg.data.kind == "v4" and cfg.data.source:
        named["data.source"] = cfg.data.source
    if cfg.teacher.kind in ("saved", "shared_compact", "published_compact"):
        named["teacher.path"] = cfg.teacher.path
    shared = cfg.compress.shared
    if shared is not None:
        named["compress.shared.path"] = shared.path
        named["compress.shared.init_from"] = shared.init_from
    for key, p in named.items():
        if p and not Path(p).expanduser().exists():
            raise FileNotFoundError(f"{key}: {p} does not exist (relative paths are read from {Path.cwd()})")


# -- stage 1: sessions ------------------------------------------------------------------------------
def prepare_sessions(cfg: JobConfig):
    """Sessions (and the simulated ground truth, if any) for the job. Returns (sessions, truth, dir)."""
    from farm.data.sessions import check_job_sessions, list_sessions, read_sessions

    d = Path(cfg.data.dir)
    kind = cfg.data.kind
    truth = None
    if kind == "simulated":
        from farm.data.simulate import (SimulationConfig, load_ground_truth, simulate_population,
                                        write_population)

        sim = SimulationConfig.from_dict({"seed": cfg.seed, **cfg.data.simulate})
        if (d / "population.json").is_file():  # a simulated population serves only the config that made it
            old = json.loads((d / "population.json").read_text()).get("config", {})
            new = json.loads(json.dumps(sim.to_dict()))  # as stored (tuples as lists)
            if _changed(old, new):
                raise ValueError(f"data.simulate: the population simulated in {d} was made with another config "
                                 f"({_there_asked(old, new)}); delete {d} to simulate it again, or set data.dir to "
                                 f"another folder")
        else:
            log.info("simulating %d sessions x %d neurons x %d images (%d px) into %s",
                     sim.n_sessions, sim.n_neurons, sim.n_images, sim.image_size, d)
            write_population(simulate_population(sim), d)
        truth = load_ground_truth(d)
        sessions_dir = d / "sessions"
    elif kind == "v4":
        from farm.data.v4release import import_v4_release

        have = {p.stem for p in list_sessions(d)} if d.is_dir() else set()
        if cfg.data.source:  # every session of the release must be there (a failed import left some out)
            from farm.data.v4release import release_sessions

            missing = [s for s in release_sessions(cfg.data.source) if s not in have]
            if missing:
                log.info("importing V4 sessions %s from %s into %s", missing, cfg.data.source, d)
                import_v4_release(cfg.data.source, d, sessions=missing)
        elif not have:
            raise ValueError("data.source: the V4 release folder is needed to import (data.kind: v4)")
        sessions_dir = d
    elif kind == "sessions":
        sessions_dir = d
    else:
        raise ValueError(f"data.kind must be simulated, v4 or sessions, got {kind!r}")
    sessions = read_sessions(sessions_dir)
    if not sessions:
        raise FileNotFoundError(f"{sessions_dir}: no sessions (*.parquet)")
    check_job_sessions(sessions, str(sessions_dir))
    return sessions, truth, sessions_dir


# -- stage 2: teacher -------------------------------------------------------------------------------
def prepare_teacher(cfg: JobConfig, sessions, truth, sessions_dir: Path, tracker: Tracker | None = None):
    """The teacher (a farm.models.base.Teacher) and a dict describing it."""
    t = cfg.teacher
    out = Path(cfg.out_dir)
    if t.kind == "ground_truth":
        if truth is None:
            raise ValueError("teacher.kind ground_truth needs simulated data (data.kind: simulated)")
        ids = [n for s in sessions if s.session_id == (t.session or _test_session(sessions)) for n in s.neuron_ids]
        teacher = truth.subset(ids)
        return teacher, {"kind": "ground_truth", "teacher_id": f"truth-{Path(cfg.data.dir).name}",
                         "pretrained": None}
    if t.kind in PUBLISHED_KINDS:
        teacher, teacher_id = published_teacher(t.kind, t.path, t.session)
        return teacher, {"kind": t.kind, "path": str(t.path), "pretrained": None, "teacher_id": teacher_id}
    from farm.teacher import EnsembleTeacher
    from farm.teacher_training import run_teacher_training

    tdir = Path(t.path) if t.path else out / "teacher"
    tconf = None
    if t.kind == "ensemble":
        tconf = t.config
        if isinstance(tconf, str):
            tconf = read_yaml(resolve_config_path(tconf))
        tconf = dict(tconf or {})
        tconf = tconf.get("teacher", tconf)
        if t.session:
            tconf["test_session"] = t.session
        elif not tconf.get("test_session"):
            _test_session(sessions)  # the session to compress must exist before the teacher trains
    if t.kind == "saved" or (tdir / "teacher" / "teacher.json").is_file() or (tdir / "teacher.json").is_file():
        src = tdir / "teacher" if (tdir / "teacher" / "teacher.json").is_file() else tdir
        report = json.loads((tdir / "report.json").read_text()) if (tdir / "report.json").is_file() else {}
        if t.kind == "ensemble":
            _check_reused_teacher(tdir, report, tconf, sessions, sessions_dir)
        teacher = EnsembleTeacher.load(src)
    elif t.kind == "ensemble":
        log.info("training the teacher (deep ensemble) on %s", sessions_dir)

        def cb(event, info):  # farm.teacher logs each visit as a line; the raw dicts with --verbose
            log.debug("teacher %s: %s", event, {k: v for k, v in info.items() if not isinstance(v, (list, dict))})

        teacher, report = run_teacher_training(tconf, sessions_dir, tdir, callback=cb)
    else:
        raise ValueError(f"teacher.kind must be ensemble, saved, shared_compact, published_compact or "
                         f"ground_truth, got {t.kind!r}")
    info = {"kind": "ensemble", "path": str(tdir), "teacher_id": teacher.teacher_id,
            "pretrained": teacher.pretrained, **{k: v for k, v in report.items()
                                                 if k.startswith(("test_median", "ground_truth_median"))}}
    return teacher, info


def _check_reused_teacher(tdir: Path, report: dict, tconf: dict, sessions, sessions_dir: Path) -> None:
    """A teacher the job trained earlier (in ``tdir``) is reused only if it was trained from the same
    teacher config and the same sessions; otherwise a clear error instead of a stale teacher."""
    from farm.teacher_config import TeacherConfig
    from farm.teacher_training import training_stamp

    old = report.get("trained_on")
    if old is None:  # a teacher saved before the stamp existed: reused as before
        return
    new = training_stamp(TeacherConfig.load(tconf), sessions)
    what = []
    if old["sessions"] != new["sessions"]:
        what.append(f"sessions {sorted(old['sessions'])} (id -> role, neurons, images: {old['sessions']}), "
                    f"but {sessions_dir} now holds {new['sessions']}")
    diff = _changed(old["config"], new["config"])
    if diff:
        what.append("a teacher config that differs in " + ", ".join(
            f"{k} ({old['config'].get(k)!r} -> {new['config'].get(k)!r})" for k in diff))
    if what:
        raise ValueError(f"{tdir}: this job's teacher was trained from {'; and from '.join(what)}. Remove {tdir} "
                         f"to train a new one (or give the job another out_dir); to reuse a teacher on purpose, "
                         f"use teacher.kind: saved with teacher.path")


def _test_session(sessions) -> str:
    tests = [s.session_id for s in sessions if s.role == "test"]
    if not tests:
        raise ValueError("no session has role 'test'; name one with teacher.session")
    return tests[0]


# -- stage 3: image bank + teacher responses --------------------------------------------------------
def job_image_size(cfg: JobConfig, sessions, teacher) -> int:
    """The one image size of the job: its sessions' (every model is scored on their images). A bank,
    student or compact teacher of another size fails here, naming the key, instead of in every
    neuron task after its training."""
    size = next((s.images.shape[1] for s in sessions if s.images_available and s.images.size), None)
    if size is None:
        raise ValueError(f"{cfg.data.dir}: no session has images; the bank, the teacher and the compact models "
                         f"need the sessions' images")
    asked = {"bank.bank.image_size": cfg.bank.bank.get("image_size"),
             "compress.image_size": cfg.compress.image_size}
    sizes = {getattr(getattr(m, "spec", None), "image_size", None) for m in getattr(teacher, "models", [])}
    sizes.discard(None)  # compact teachers take one size (an ensemble resizes)
    if sizes:
        asked[f"the teacher ({cfg.teacher.kind}{f' at {cfg.teacher.path}' if cfg.teacher.path else ''})"] = \
            sizes.pop() if len(sizes) == 1 else sorted(sizes)
    bad = {k: v for k, v in asked.items() if v is not None and v != size}
    if bad:
        raise ValueError(f"the sessions' images are {size} px, but " + ", ".join(f"{k} is {v}" for k, v in bad.items())
                         + f": every model is scored on the sessions' images, so the job needs {size} px throughout")
    return size


def prepare_bank(cfg: JobConfig, sessions, exclude: set[str], image_size: int):
    """The distillation bank, built from the images of sessions with ``bank.source_roles``, never
    from the sessions in ``exclude`` (the neurons' own sessions, whose images evaluate them)."""
    from farm.data.images import BankConfig, ImageBank, build_bank, source_digest

    bdir = Path(cfg.bank.dir) if cfg.bank.dir else Path(cfg.out_dir) / "bank"
    bconf = BankConfig.from_dict({"image_size": image_size, "seed": cfg.seed, **cfg.bank.bank})
    used = [s for s in sessions if s.role in cfg.bank.source_roles
            and s.session_id not in exclude and s.images_available and s.images.size]
    sources = [s.images for s in used]
    natural = bconf.proportions.get("natural", 0) > 0  # without natural images the sources are unused
    if (bdir / "bank.json").is_file():  # a cached bank serves only the config and sources that built it
        bank = ImageBank(bdir)
        old, new = bank.config.to_dict(), bconf.to_dict()
        if _changed(old, new):
            raise ValueError(f"bank: the image bank cached in {bdir} was built with another config "
                             f"({_there_asked(old, new)}); delete {bdir} to rebuild it, or set bank.dir to another "
                             f"folder")
        if natural and bank.manifest.get("source_hash") not in (None, source_digest(sources or None)):
            raise ValueError(f"bank: the image bank cached in {bdir} was built from other source images than "
                             f"this job's (sessions {[s.session_id for s in used]}: roles {cfg.bank.source_roles}, "
                             f"never {sorted(exclude)}, whose images evaluate the neurons); bank.source_roles, "
                             f"the teacher's session or the sessions changed. Delete {bdir} to rebuild it, or set "
                             f"bank.dir to another folder")
        return bank
    if not sources and natural:
        raise ValueError(f"bank: no source images in sessions with roles {cfg.bank.source_roles} "
                         f"(excluding {sorted(exclude)}); set bank.bank.proportions without 'natural'")
    log.info("building image bank: %d images (%d px) from %d sessions -> %s", bconf.n_images,
             bconf.image_size, len(sources), bdir)
    return build_bank(sources or None, bconf, bdir)


@dataclass
class PreparedJob:
    inputs: NeuronInputs
    teacher_info: dict
    bank_id: str
    neuron_ids: list  # the teacher's neurons (columns of the response table)
    truth_filters: dict = field(default_factory=dict)  # neuron id -> true filter count (simulated)
    teacher_real_r2: dict = field(default_factory=dict)  # neuron id -> the teacher's R² on real data
    shared_info: dict = field(default_factory=dict)  # the "shared" recipe's stage 1 (cost, R²), if any


def progress_bar(desc: str, unit: str = "item"):
    """A ``progress(done, total, what="")`` callback drawing a tqdm bar, opened at the first call and
    closed when ``done`` reaches ``total`` (which may be None: unknown)."""
    from tqdm import tqdm

    state: dict = {}

    def progress(done: int, total: int | None, what: str = "") -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        bar = state["bar"]
        bar.update(done - bar.n)
        if what:
            bar.set_postfix_str(str(what))
        if total is not None and done >= total:
            bar.close()

    return progress


def prepare_job(cfg: JobConfig, tracker: Tracker | None = None, progress: bool = False) -> PreparedJob:
    """Sessions, teacher, bank and the teacher's responses to it (each stage cached under out_dir);
    ``progress`` draws a bar while the teacher runs over the bank."""
    from farm.compress import CompressConfig
    from farm.teacher_responses import compute_teacher_responses, split_heldout
    from farm.metrics import evaluate_predictions

    check_input_paths(cfg)
    sessions, truth, sessions_dir = prepare_sessions(cfg)
    teacher, tinfo = prepare_teacher(cfg, sessions, truth, sessions_dir, tracker)
    for key, sel in (("neurons", cfg.neurons), ("sweep.neurons", cfg.sweep.neurons)):
        if sel:  # a selection naming neurons the teacher lacks fails now, before the bank and its responses
            try:
                parse_neuron_selection(sel, list(teacher.neuron_ids))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
    neuron_sessions = {n.split(":", 1)[0] for n in teacher.neuron_ids}
    image_size = job_image_size(cfg, sessions, teacher)
    bank = prepare_bank(cfg, sessions, neuron_sessions, image_size)
    runner = None
    if 0 < cfg.farm.teacher_tasks_min_images <= len(bank) and len(bank.shards) > 1:
        from farm.fanout import ray_shard_runner

        init_job_ray(cfg, tracker or _tracker(cfg))
        runner = ray_shard_runner(cfg.farm.num_cpus, cfg.farm.num_gpus, cfg.farm.max_retries)
        log.info("teacher responses to %d bank images: %d Ray tasks, one per shard (unless cached)",
                 len(bank), len(bank.shards))
    resp = compute_teacher_responses(teacher, bank, cache_dir=Path(cfg.out_dir) / "responses",
                                     teacher_id=tinfo["teacher_id"], runner=runner,
                                     progress=progress_bar("teacher responses", "img") if progress else None)
    images = bank.load_all()[1]
    if not np.array_equal(resp.image_ids, np.arange(len(images))):
        order = np.argsort(resp.image_ids)
        images = images[resp.image_ids[order]]
        targets = resp.responses[order]
    else:
        targets = resp.responses
    n_held = min(cfg.bank.heldout, len(images) // 2)
    train_idx, held_idx = split_heldout(len(images), n_held, cfg.seed)
    mirror_targets = None
    if CompressConfig.from_dict(cfg.compress).uses_mirrors:  # once for all neurons, cached as the others
        log.info("teacher responses to the %d bank images' left-right mirrors (compress: mirrors)", len(bank))
        mresp = compute_teacher_responses(teacher, bank, cache_dir=Path(cfg.out_dir) / "responses",
                                          teacher_id=tinfo["teacher_id"], runner=runner, mirror=True,
                                          progress=progress_bar("teacher responses (mirrors)", "img")
                                          if progress else None)
        mirror_targets = mresp.responses[np.argsort(mresp.image_ids)][train_idx]
        del mresp
    real, teacher_r2, teacher_real = {}, {}, {}
    for s in sessions:
        if s.session_id in neuron_sessions and s.images_available and s.images.size:
            second = s.halves()[1]  # method.md §1.6: the second half evaluates
            real[s.session_id] = {"images": second.images, "responses": second.responses,
                                  "has_repeats": bool(s.has_repeats), "neuron_ids": list(s.neuron_ids)}
            cols = [list(teacher.neuron_ids).index(n) for n in s.neuron_ids if n in teacher.neuron_ids]
            rows = [i for i, n in enumerate(s.neuron_ids) if n in teacher.neuron_ids]
            pred = teacher.predict(second.images)[:, cols].T
            ev = evaluate_predictions(second.responses[rows], pred, s.has_repeats)
            key = "r2_er" if s.has_repeats else "r2_raw"
            for j, i in enumerate(rows):
                teacher_r2[s.neuron_ids[i]] = float(ev[key][j])
                teacher_real[s.neuron_ids[i]] = {f"teacher_{key}": float(ev[key][j])}
    gt = None
    filters = {}
    if truth is not None:
        sub = truth.subset(list(teacher.neuron_ids))
        gt = sub.predict(images[held_idx])
        filters = sub.filter_counts
    inputs = NeuronInputs(list(teacher.neuron_ids), images[train_idx], targets[train_idx],
                          images[held_idx], targets[held_idx], real, gt, teacher_real=teacher_real,
                          bank_mirror_targets=mirror_targets)
    inputs.shared_start, shared_info = prepare_shared_start(cfg, inputs, f"{tinfo['teacher_id']}|{resp.bank_id}")
    inputs.shared_features, features_info = prepare_shared_features(cfg, inputs)
    if features_info:
        shared_info = {**shared_info, "early_features": features_info}
    bank_id = resp.bank_id
    del images, targets, resp
    release_freed_memory()  # the teacher's passes over the bank and the copies above: not the driver's to keep
    return PreparedJob(inputs, tinfo, bank_id, list(teacher.neuron_ids), filters, teacher_r2, shared_info)


# -- stage 4 (the "shared" recipe): one shared student for all neurons -------------------------------
def prepare_shared_start(cfg: JobConfig, inputs: NeuronInputs, source_id: str):
    """The shared student the neurons start from (``compress.shared``, e.g. ``recipe: shared``), trained
    once on the driver for every neuron of the teacher and cached under ``out_dir/shared`` keyed by
    its config, the teacher, the bank and the seed. Returns (model, info) or (None, {}) when the
    recipe has no shared stage."""
    import hashlib

    import torch

    from farm.compress import CompressConfig
    from farm.models.compact import load_compact, save_compact
    from farm.shared_start import distill_shared

    ccfg = CompressConfig.from_dict(cfg.compress)
    if ccfg.shared is None:
        return None, {}
    if ccfg.shared.path:
        from farm.shared_start import load_shared_start

        return load_shared_start(ccfg.shared.path, inputs.neuron_ids), {"path": str(ccfg.shared.path)}
    key = json.dumps({"shared": ccfg.shared.to_dict(), "source": source_id, "seed": cfg.seed,
                      "neurons": list(inputs.neuron_ids), "n_train": len(inputs.bank_images)}, sort_keys=True)
    d = Path(cfg.out_dir) / "shared" / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    if (d / "shared.json").is_file():
        return load_compact(d / "model"), json.loads((d / "shared.json").read_text())
    threads = max(1, int(cfg.farm.local_num_cpus or os.cpu_count() or 1))
    torch.set_num_threads(threads)
    print(f"shared student {ccfg.shared.filters} for {len(inputs.neuron_ids)} neurons "
          f"({ccfg.shared.distill.total_images(len(inputs.bank_images)):,} images, {threads} threads) ...",
          flush=True)
    res = distill_shared(inputs.neuron_ids, inputs.bank_images, inputs.bank_targets, ccfg.shared, seed=cfg.seed,
                         eval_images=inputs.heldout_images, eval_targets=inputs.heldout_targets)
    r2 = res.history[-1].get("eval_r2") if res.history else None
    r2 = [r2] if isinstance(r2, float) else r2
    save_compact(res.model, d / "model")
    info = {"seconds": res.seconds, "cpu_seconds": res.cpu_seconds, "steps": res.steps,
            "r2_teacher_heldout": r2, "config": ccfg.shared.to_dict(), "neuron_ids": list(inputs.neuron_ids)}
    tmp = d / "shared.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(d / "shared.json")  # the marker last: a half-written cache is never taken for a finished one
    if r2:
        print(f"shared student: {res.seconds:.0f} s, median R² to the teacher on held-out images "
              f"{float(np.median(r2)):.3f}", flush=True)
    return res.model, info


def prepare_shared_features(cfg: JobConfig, inputs: NeuronInputs):
    """With a shared student and ``compress.specialize``: its layer-2 activations of the bank images
    (and their mirrors with ``specialize.flip``), the same for every neuron's specialization, and its
    map of each neuron the job (and its sweep) selects on them (layers 3-4 once for all), computed
    once and cached under ``out_dir/shared_features`` keyed by their content (``farm.shared_features``).
    Returns ({"path", "flip", "n_images", "maps"}, info) for the neuron tasks, or (None, {})."""
    from farm.compress import CompressConfig
    from farm.files import write_text_atomic
    from farm.shared_features import early_key, load_early_features, maps_key, save_early_features, save_neuron_maps

    ccfg = CompressConfig.from_dict(cfg.compress)
    shared = inputs.shared_start
    if shared is None or ccfg.specialize is None:
        return None, {}
    flip = bool(ccfg.specialize.flip)
    key = early_key(shared, inputs.bank_images, flip)
    d = Path(cfg.out_dir).resolve() / "shared_features" / key
    ref = {"path": str(d / "early.npy"), "flip": flip, "n_images": len(inputs.bank_images)}
    threads = max(1, int(cfg.farm.local_num_cpus or os.cpu_count() or 1))
    if (d / "early.json").is_file() and (d / "early.npy").is_file():
        info = json.loads((d / "early.json").read_text())
    else:
        n = len(inputs.bank_images) * (2 if flip else 1)
        print(f"shared student's layer-2 activations of {n:,} bank images{' and mirrors' if flip else ''}, once "
              f"for all neurons ({threads} threads) ...", flush=True)
        torch_threads = _set_threads(threads)
        try:
            info = save_early_features(shared, inputs.bank_images, d / "early.npy", flip=flip)
        finally:
            _set_threads(torch_threads)
        write_text_atomic(d / "early.json", json.dumps(info, indent=1))  # the marker last
        print(f"layer-2 activations: {info['seconds']:.0f} s, {d / 'early.npy'}", flush=True)
    if shared.spec.readout != "factorized":
        return ref, info
    md = d / "maps" / maps_key(shared, key)
    wanted = set()  # the job's neurons and its sweep's: not the teacher's others
    for sel in (cfg.neurons, cfg.sweep.neurons):
        if sel:
            wanted.update(parse_neuron_selection(sel, inputs.neuron_ids))
    ref["maps"] = {nid: str(md / (neuron_slug(nid) + ".npy"))
                   for nid in inputs.neuron_ids if nid in wanted and nid in shared.spec.neuron_ids}
    todo = [nid for nid, p in ref["maps"].items() if not Path(p).is_file()]
    if todo:
        print(f"shared student's maps of {len(todo)} neurons on them, once for all ...", flush=True)
        torch_threads = _set_threads(threads)
        try:
            early = load_early_features(d / "early.npy", len(inputs.bank_images), flip, shared)
            maps = save_neuron_maps(shared, early, todo, [ref["maps"][nid] for nid in todo])
        finally:
            _set_threads(torch_threads)
        print(f"neuron maps: {maps['seconds']:.0f} s, {md}", flush=True)
        info = {**info, "maps": maps, "cpu_seconds": info["cpu_seconds"] + maps["cpu_seconds"]}
    return ref, info


def _set_threads(n: int) -> int:
    """Set torch's intra-op threads to ``n``; returns the previous number."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    return old


# -- the jobs ---------------------------------------------------------------------------------------
def _tracker(cfg: JobConfig) -> Tracker:
    return Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)


@contextlib.contextmanager
def _one_driver(cfg: JobConfig, job_id: str):
    """Before a job's driver works: its results must not land in a Ray Job's temporary working dir,
    and no other driver of the same job may be running (a lock in out_dir naming its pid and host)."""
    from farm.submit import check_not_in_ray_job_copy

    check_not_in_ray_job_copy(cfg)
    with exclusive(Path(cfg.out_dir) / f".job-{job_id}.lock", f"job {job_id}"):
        yield


@contextlib.contextmanager
def _killed_on_interrupt(tracker: Tracker, parent: str):
    """Ctrl-C: the job's run and its runs still RUNNING end KILLED (a rerun resumes), then re-raise."""
    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # first stop the tasks, so that none starts a run after this
            stop_ray()
        with contextlib.suppress(Exception):
            for r in tracker.child_runs(parent):
                if r.info.status == "RUNNING":
                    tracker.end_run(r.info.run_id, "KILLED")
            tracker.end_run(parent, "KILLED")
        raise


def run_compress_job(cfg: JobConfig, progress: bool = True, prepared: PreparedJob | None = None) -> JobResult:
    """Compress the selected neurons of the teacher: one Ray task and one MLflow child run each.
    One driver per job: a second one exits at once naming the first (``farm.files.exclusive``)."""
    with _one_driver(cfg, cfg.resolved_job_id()):
        return _run_compress_job(cfg, progress, prepared)


def _run_compress_job(cfg: JobConfig, progress: bool, prepared: PreparedJob | None) -> JobResult:
    from farm import plots

    t0 = time.time()
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    tracker = _tracker(cfg)
    prepared = prepared or prepare_job(cfg, tracker, progress=progress)
    neurons = parse_neuron_selection(cfg.neurons, prepared.neuron_ids)
    job_id = cfg.resolved_job_id()
    parent = tracker.start_job(job_id, params=_job_params(cfg, prepared),
                               tags=_job_tags(cfg, prepared))
    done = tracker.finished_neurons(parent)
    todo = [n for n in neurons if n not in done]
    log.info("job %s: %d neurons selected, %d already finished, %d to compress", job_id, len(neurons),
             len(neurons) - len(todo), len(todo))
    with _killed_on_interrupt(tracker, parent):
        init_job_ray(cfg, tracker)
        rows = run_neurons(todo, prepared.inputs, cfg.compress, cfg.seed, tracker, parent,
                           num_cpus=cfg.farm.num_cpus, num_gpus=cfg.farm.num_gpus,
                           max_retries=cfg.farm.max_retries, device=cfg.farm.device,
                           register=cfg.tracking.register_models, progress=progress,
                           pack=cfg.farm.pack, memory_gb=cfg.farm.memory_gb) if todo else []
    # Job-level figures over every finished neuron (this run's and earlier runs').
    finished = [r for r in tracker.child_runs(parent, "neuron") if r.info.status == "FINISHED"]
    summary = [_row_from_run(r, prepared) for r in finished]
    summary = [s for s in summary if s["neuron_id"] in set(neurons)]
    if summary:
        _log_job_figures(tracker, parent, summary, plots)
        tracker.log_table(parent, _summary_table(summary, rows), "neurons.json")
        import statistics

        tracker.log_metrics(parent, {
            "neurons_finished": len(summary),
            "neurons_failed": sum(r.get("status") == "FAILED" for r in rows),
            "median_param_count": statistics.median(s["param_count"] for s in summary),
            "median_r2_teacher_heldout": statistics.median(s["r2_teacher_heldout"] for s in summary),
            "job_seconds": time.time() - t0, **_shared_metrics(prepared)})
    tracker.end_run(parent, "FINISHED")
    result = JobResult(job_id, parent, rows, sorted(done))
    result.summary = sorted(summary, key=lambda s: neuron_sort_key(s["neuron_id"]))
    result.tracking_uri = tracker.uri
    _write_summary(Path(cfg.out_dir) / "summary.json", result)
    if progress:
        print_summary(result.summary, title=f"job {job_id}")
    return result


def run_sweep_job(cfg: JobConfig, progress: bool = True, prepared: PreparedJob | None = None):
    """Tune sweep of pruning thresholds for ``cfg.sweep.neurons`` (default: the first 2 selected)."""
    with _one_driver(cfg, cfg.resolved_job_id() + "-sweep"):
        return _run_sweep_job(cfg, progress, prepared)


def _run_sweep_job(cfg: JobConfig, progress: bool, prepared: PreparedJob | None):
    from farm.sweep import run_sweep

    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    tracker = _tracker(cfg)
    prepared = prepared or prepare_job(cfg, tracker, progress=progress)
    sel = cfg.sweep.neurons or cfg.neurons
    neurons = parse_neuron_selection(sel, prepared.neuron_ids)
    if not cfg.sweep.neurons:
        neurons = neurons[:2]
    job_id = cfg.resolved_job_id() + "-sweep"
    parent = tracker.start_job(job_id, params={**_job_params(cfg, prepared), "sweep": cfg.sweep.__dict__},
                               tags=_job_tags(cfg, prepared), kind="sweep")
    with _killed_on_interrupt(tracker, parent):
        init_job_ray(cfg, tracker)
        results = run_sweep(neurons, prepared.inputs, cfg.compress, cfg.sweep.taus, cfg.sweep.criteria, tracker,
                            parent, storage_path=str(Path(cfg.out_dir).resolve() / "tune"), name=job_id,
                            seed=cfg.seed, eps=cfg.sweep.eps, search=cfg.sweep.search,
                            num_samples=cfg.sweep.num_samples, max_concurrent=cfg.sweep.max_concurrent,
                            max_failures=cfg.sweep.max_failures, num_cpus=cfg.farm.num_cpus,
                            num_gpus=cfg.farm.num_gpus, device=cfg.farm.device, progress=progress,
                            memory_gb=cfg.farm.memory_gb)
    tracker.end_run(parent, "FINISHED")
    if progress:
        print("\nsweep (per neuron: trials, Pareto front, chosen = smallest with R² >= "
              f"(1 - {cfg.sweep.eps}) x distilled):")
        for r in results:
            print(f"  {r.neuron_id}: distilled R² {r.r2_teacher_distilled:.3f}")
            for i, t in enumerate(r.trials):
                mark = ("*" if i == r.chosen else " ") + ("P" if i in r.front else " ")
                print(f"    {mark} {t['criterion']:<14} tau={t['tau']:.2f} params={t['param_count']:>7} "
                      f"R²={t['r2_teacher_heldout']:.3f}")
            if r.trials and r.chosen is None:
                print(f"    (no trial reached {1 - cfg.sweep.eps:.2f} x the distilled R²: none chosen; try higher "
                      f"taus or a larger sweep.eps)")
    return results


def run_demo(out_dir: str = "farm_runs/demo", overrides: list[str] | None = None) -> JobResult:
    """The embedded default: simulate -> small teacher -> compress one session -> sweep 2 neurons."""
    t0 = time.time()
    cfg = load_job_config("demo", [f"out_dir={out_dir}", f"data.dir={Path(out_dir) / 'data'}",
                                   *(overrides or [])])
    tracker = _tracker(cfg)
    prepared = prepare_job(cfg, tracker, progress=True)
    result = run_compress_job(cfg, progress=True, prepared=prepared)
    run_sweep_job(cfg, progress=True, prepared=prepared)
    extra = " ".join(shlex.quote(o) for o in [f"out_dir={out_dir}", f"data.dir={Path(out_dir) / 'data'}",
                                              *(overrides or [])]) \
        if (out_dir != "farm_runs/demo" or overrides) else ""
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Browse the runs in the MLflow UI:\n  "
          f"{ui_command(tracker.uri)}\nthen open {ui_url(tracker.uri, cfg.tracking.experiment)}\n"
          f"Look inside every compact model (maximizing images, saliency, dot tuning, ...; ~2 min):\n  "
          f"farm analyze --config demo {extra}".rstrip())
    return result


# -- reporting --------------------------------------------------------------------------------------
def _shared_metrics(prepared: PreparedJob) -> dict:
    """The shared student's cost and fit, for the job run (the "shared" recipe)."""
    info = prepared.shared_info or {}
    out = {}
    if "cpu_seconds" in info:
        out["shared_cpu_seconds"] = info["cpu_seconds"]
        out["shared_cpu_seconds_per_neuron"] = info["cpu_seconds"] / max(1, len(info.get("neuron_ids") or [1]))
    if "early_features" in info:  # their cost and the maps', once for all neurons (a cached copy costs no more)
        out["shared_features_cpu_seconds"] = info["early_features"]["cpu_seconds"]
    if info.get("r2_teacher_heldout"):
        out["shared_median_r2_teacher_heldout"] = float(np.median(info["r2_teacher_heldout"]))
    return out


def _job_params(cfg: JobConfig, prepared: PreparedJob) -> dict:
    return {"config": json.dumps(cfg.to_dict(), default=str), "teacher_id": prepared.teacher_info["teacher_id"],
            "teacher_kind": prepared.teacher_info["kind"], "bank_id": prepared.bank_id,
            "code_version": code_version(), "n_bank_images": len(prepared.inputs.bank_images),
            "n_heldout_images": len(prepared.inputs.heldout_images)}


def _job_tags(cfg: JobConfig, prepared: PreparedJob) -> dict:
    tags = {"farm.teacher_id": str(prepared.teacher_info["teacher_id"]), "farm.bank_id": prepared.bank_id,
            "farm.code_version": code_version()}
    if prepared.teacher_info.get("pretrained") is not None:
        tags["farm.teacher_pretrained"] = str(prepared.teacher_info["pretrained"]).lower()
    return tags


def _summary_table(summary: list, rows: list) -> list[dict]:
    """One row per neuron for the job run's table artifact (the MLflow UI shows it as a table)."""
    out = []
    for r in sorted(summary, key=lambda r: neuron_sort_key(r["neuron_id"])):
        real = "r2_er" if "r2_er" in r else "r2_raw"
        out.append({"neuron": r["neuron_id"], "status": "FINISHED", "params": r["param_count"],
                    "filters": "-".join(str(k) for k in r["filters"]),
                    "r2_to_teacher": round(float(r["r2_teacher_heldout"]), 4),
                    real: None if r.get(real) is None else round(float(r[real]), 4),
                    f"teacher_{real}": (None if r.get("teacher_real_r2") is None
                                        else round(float(r["teacher_real_r2"]), 4))})
    done = {r["neuron"] for r in out}
    out += [{"neuron": r["neuron_id"], "status": r.get("status", "FAILED")} for r in rows
            if r.get("status") == "FAILED" and r["neuron_id"] not in done]
    return out


def _row_from_run(run, prepared: PreparedJob) -> dict:
    m = run.data.metrics
    nid = run.data.tags["farm.neuron_id"]
    row = {"neuron_id": nid, "run_id": run.info.run_id,
           "param_count": int(m.get("param_count", 0)), "total_filters": int(m.get("total_filters", 0)),
           "filters": [int(m.get(f"filters_layer{i}", 0)) for i in range(5)],
           "r2_teacher_heldout": m.get("r2_teacher_heldout", float("nan"))}
    for k in ("r2_ground_truth", "r2_er", "r2_raw", "r2_teacher_distilled"):
        if k in m:
            row[k] = m[k]
    if nid in prepared.teacher_real_r2:
        row["teacher_real_r2"] = prepared.teacher_real_r2[nid]
    if nid in prepared.truth_filters:
        row["true_filters"] = prepared.truth_filters[nid]
    return row


def _log_job_figures(tracker: Tracker, parent: str, summary: list, plots) -> None:
    import matplotlib.pyplot as plt

    figs = [(plots.params_histogram_figure([s["param_count"] for s in summary]), "figures/params_histogram.png"),
            (plots.filters_per_layer_figure([s["filters"] for s in summary]), "figures/filters_per_layer.png")]
    real_key = "r2_er" if any("r2_er" in s for s in summary) else "r2_raw"
    pairs = [(s["teacher_real_r2"], s[real_key]) for s in summary if "teacher_real_r2" in s and real_key in s]
    if pairs:
        x, y = zip(*pairs)
        figs.append((plots.r2_scatter_figure(x, y, f"teacher {real_key}", f"compact {real_key}"),
                     "figures/compact_vs_teacher_r2.png"))
    for fig, name in figs:
        tracker.log_figure(parent, fig, name)
        plt.close(fig)


def _write_summary(path: Path, result: JobResult) -> None:
    write_text_atomic(path, json.dumps({"job_id": result.job_id, "parent_run_id": result.parent_run_id,
                                        "tracking_uri": result.tracking_uri, "neurons": result.summary,
                                        "failed": result.failed}, indent=2, default=str))


def print_summary(summary: list, title: str = "") -> None:
    real = "r2_er" if any("r2_er" in s for s in summary) else ("r2_raw" if any("r2_raw" in s for s in summary) else None)
    gt = any("r2_ground_truth" in s for s in summary)
    head = f"{'neuron':<12} {'params':>8} {'filters':>7} {'K0..K4':<20} {'R² teacher':>10}"
    if gt:
        head += f" {'R² truth':>9} {'true filt':>9}"
    teacher_real = real is not None and any("teacher_real_r2" in s for s in summary)
    if real:
        head += f" {real + ' (data)':>14}"
    if teacher_real:
        head += f" {'teacher ' + real:>14}"
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for s in summary:
        line = (f"{s['neuron_id']:<12} {s['param_count']:>8,} {s['total_filters']:>7} "
                f"{str(tuple(s['filters'])):<20} {s['r2_teacher_heldout']:>10.3f}")
        if gt:
            line += f" {s.get('r2_ground_truth', float('nan')):>9.3f} {s.get('true_filters', '-'):>9}"
        if real:
            line += f" {s.get(real, float('nan')):>14.3f}"
        if teacher_real:
            line += f" {s.get('teacher_real_r2', float('nan')):>14.3f}"
        print(line)
    if summary:
        print(f"median parameters: {int(np.median([s['param_count'] for s in summary])):,}; "
              f"median R² to teacher: {np.median([s['r2_teacher_heldout'] for s in summary]):.3f}")
