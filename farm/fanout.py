"""Ray at the edge: set-up, one task per neuron (or per packed group), retries, results as they finish.

The driver puts the bank images and the teacher's responses (images x neurons) into the object store
once; every task reads them zero-copy and runs ``farm.neuron_runs.compress_group_and_log`` (compress,
log one MLflow child run per neuron). Results are handled as they finish (``ray.wait``) with a
progress bar. A system failure (a killed worker) is retried by Ray; an exception inside a neuron's
compression ends that neuron's run FAILED with the error as a tag, and the job goes on. Re-running
a job skips neurons that already have a FINISHED run. Also here: the teacher's responses over a big
bank as one task per shard, and maximizing natural images over a bank as tasks over chunks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from farm.tracking import Tracker

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
from farm.neuron_runs import NeuronInputs, compress_group_and_log, neuron_params
from farm.task_env import init_task


# -- Ray set-up -------------------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None, env_vars: dict | None = None) -> None:
    """Connect to a cluster (``address`` or RAY_ADDRESS, e.g. inside a Ray Job) or start local Ray
    (with token auth: ``local_auth_vars``)."""
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"), **(env_vars or {})}
    env.pop("MLFLOW_RUN_ID", None)  # would override parent_run_id in workers (mlflow#15713)
    runtime_env = {"env_vars": env}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a Ray Job, Ray merges the job's runtime env with this one and refuses an env var
        # set in both: the job's own values win (they are in this driver's environment already).
        job_env = _job_env_vars()
        runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in job_env}}
        # num_cpus/object_store_memory must not be given when joining a cluster (ecosystem §7.13).
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": always a fresh local instance, never a cluster that an earlier
        # `ray start` left recorded in /tmp/ray (num_cpus would then be refused).
        with _local_auth():
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                     include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    global _started_local
    _started_local = not address


_started_local = False  # this process's Ray is the local instance init_ray started (no node can join)


_LOCAL_TOKEN: str | None = None  # this process's token for the local Ray instances it starts


def stop_ray() -> None:
    """Shut this driver's Ray down (its tasks stop), if it started or joined one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def local_auth_vars() -> dict[str, str]:
    """The auth settings the embedded local Ray starts with. Its GCS, raylet and worker ports listen
    on every interface (Ray 2.60 cannot bind them to loopback, ecosystem.md §5f), so without auth
    anyone who can reach this machine could run code in farm's workers: token auth with a random
    token made once per process, whatever RAY_AUTH_MODE says for clusters. {} when the user brings
    a token of their own (``RAY_AUTH_MODE=token`` with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token)."""
    import secrets

    global _LOCAL_TOKEN
    if os.environ.get("RAY_AUTH_MODE") == "token" and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        return {}
    if _LOCAL_TOKEN is None:
        _LOCAL_TOKEN = secrets.token_hex(32)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _LOCAL_TOKEN}


@contextlib.contextmanager
def _local_auth():
    """``local_auth_vars`` in this process's environment while a local Ray starts (its processes
    copy the environment then; nothing is written to ~/.ray), then the environment as it was, so
    that nothing else (``farm submit``, a later cluster connection) sees the token. Ray reads its
    auth mode and token once, at import: both caches are refreshed, as Ray's own
    authentication_token_setup._enable_token_auth does, so this driver speaks token mode too."""
    changes = local_auth_vars()
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        if changes:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_memory(memory_gb: float | None) -> dict:
    """Ray ``.options`` reserving ``memory_gb`` GiB per task ({} for None). Checked against the nodes
    Ray has now: on local Ray a request no node can hold would wait forever, so it is an error; a
    cluster may add a larger node (autoscaler), so there it is a warning."""
    if memory_gb is None:
        return {}
    import ray

    want = int(memory_gb * 2**30)
    have = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if want > have:
        msg = (f"farm.memory_gb = {memory_gb} GiB per task, but the largest Ray node offers "
               f"{have / 2**30:.1f} GiB of memory: lower farm.memory_gb")
        if _started_local:
            raise ValueError(msg)
        log.warning("%s, or add a node that large (tasks wait until one joins)", msg)
    return {"memory": want}


def init_job_ray(cfg, tracker: Tracker) -> None:
    """Ray for a job config (``farm.*`` resources), its workers logging to the job's store."""
    init_ray(cfg.farm.address, cfg.farm.local_num_cpus, cfg.farm.object_store_memory,
             env_vars={"MLFLOW_TRACKING_URI": tracker.uri})


def _job_env_vars() -> dict:
    """The env_vars of the Ray Job this driver runs in ({} outside a Ray Job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    from ray.job_config import JobConfig

    return dict((JobConfig.from_json(json.loads(raw)).runtime_env or {}).get("env_vars") or {})



# -- the job ----------------------------------------------------------------------------------------
@dataclass
class JobResult:
    job_id: str
    parent_run_id: str
    rows: list  # one summary dict per neuron (FINISHED rows carry the metrics)
    skipped: list  # neurons already finished in an earlier run of the job

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r.get("status") == "FAILED"]


def run_neurons(neurons: Sequence[str], inputs: NeuronInputs, compress_cfg: dict, seed: int,
                tracker: Tracker, parent_run_id: str, num_cpus: float = 1, num_gpus: float = 0,
                max_retries: int = 3, device: str = "auto", register: bool = False,
                progress: bool = True, on_result: Callable[[dict], None] | None = None,
                pack: int = 1, memory_gb: float | None = None) -> list[dict]:
    """One Ray task per neuron (per ``pack`` neurons: one packed distillation each) over shared
    inputs, each reserving ``memory_gb`` GiB of Ray memory if given; results handled as they finish."""
    import ray

    remote = ray.remote(_neuron_task).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False,
        name="compress_neuron", **task_memory(memory_gb))
    tracker = tracker.at_home(ray.util.get_node_ip_address())  # tasks on other nodes: Tracker.from_node
    # Every array goes into the object store once; as top-level task arguments Ray hands them to
    # each task zero-copy (numpy arrays are read straight from shared memory).
    refs = [ray.put(a) for a in (inputs.bank_images, inputs.bank_targets, inputs.heldout_images,
                                 inputs.heldout_targets, inputs.real or {}, inputs.ground_truth_heldout,
                                 inputs.shared_start, inputs.teacher_real or {}, inputs.shared_features)]
    mirror_ref = ray.put(inputs.bank_mirror_targets)
    ids = list(inputs.neuron_ids)
    if int(pack) < 1:
        raise ValueError(f"farm.pack must be >= 1 (neurons per task), got {pack}")
    neurons = list(neurons)
    groups = [neurons[i:i + int(pack)] for i in range(0, len(neurons), int(pack))]
    pending = {remote.remote(g, ids, *refs, compress_cfg, seed, tracker, parent_run_id, device, register,
                             mirror_ref): g
               for g in groups}
    def lost(nid, err):  # retries exhausted (e.g. the worker died every time)
        tracker.log_failed_child(parent_run_id, nid, err, neuron_params(nid, compress_cfg, seed))

    return gather(pending, "neurons", "neuron", progress, on_lost=lost, on_result=on_result)


def gather(pending: dict, desc: str, unit: str, progress: bool = True,
           on_lost: Callable[[str, str], None] | None = None,
           on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Results of Ray tasks ``{ref: neuron id}`` (or ``{ref: [neuron ids]}`` for tasks returning one
    row per neuron of a group) as they finish (``ray.wait``), with a tqdm bar over neurons.

    A row is a dict with "neuron_id" and "status". A task that raised (its retries exhausted) gives
    ``{"status": "FAILED", "error": ...}`` for each of its neurons, after ``on_lost(neuron_id, error)``."""
    import ray
    from tqdm import tqdm

    pending = dict(pending)
    rows = []
    total = sum(len(v) if isinstance(v, list) else 1 for v in pending.values())
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)
            group = key if isinstance(key, list) else [key]
            try:
                got = ray.get(ref)
                got = got if isinstance(key, list) else [got]
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                got = []
                for nid in group:
                    if on_lost:
                        on_lost(nid, err)
                    got.append({"neuron_id": nid, "status": "FAILED", "error": err})
            for row in got:
                rows.append(row)
                if on_result:
                    on_result(row)
                bar.set_postfix_str(f"{row['neuron_id']} {row['status']}")
                bar.update(1)
    bar.close()
    return rows


def _neuron_task(group, neuron_ids, bank_images, bank_targets, heldout_images, heldout_targets,
                 real, ground_truth_heldout, shared_start, teacher_real, shared_features, compress_cfg, seed,
                 tracker, parent_run_id, device, register, bank_mirror_targets=None):
    import ray

    tracker = tracker.from_node(ray.util.get_node_ip_address())  # before any work: a wrong store fails now
    inputs = NeuronInputs(neuron_ids, bank_images, bank_targets, heldout_images, heldout_targets,
                          real, ground_truth_heldout, shared_start, teacher_real, shared_features,
                          bank_mirror_targets)
    return compress_group_and_log(group, inputs, compress_cfg, seed, tracker, parent_run_id, device, register)



# -- teacher responses over a big bank: one Ray task per shard ----------------------------------------
def _responses_task(teacher, bank_dir: str, shard: int, batch_size: int, mirror: bool = False):
    from farm.data.images import ImageBank
    from farm.teacher_responses import shard_responses

    init_task()
    ids, images, _ = ImageBank(bank_dir).read_shard(shard)
    if mirror:
        images = np.ascontiguousarray(images[:, :, ::-1])
    return ids, shard_responses(teacher, images, batch_size)


def ray_shard_runner(num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3):
    """A ``compute_teacher_responses`` runner: the teacher is put in the object store once and every
    bank shard is one Ray task that reads its own images from the bank folder (which must be
    readable by every worker: local Ray, or a shared filesystem on a cluster); results are gathered
    as they finish (``ray.wait``) and returned in shard order. ``mirror``: the responses to the
    images' left-right mirrors."""
    import ray

    def run(teacher, bank, batch_size: int, progress=None, mirror: bool = False):
        remote = ray.remote(_responses_task).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                     max_retries=max_retries)
        ref = ray.put(teacher)
        bank_dir = str(Path(bank.directory).resolve())
        pending = {remote.remote(ref, bank_dir, i, batch_size, mirror): i for i in range(len(bank.shards))}
        parts, done = {}, 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                i = pending.pop(r)
                parts[i] = ray.get(r)
                done += len(parts[i][0])
                if progress is not None:
                    progress(done, len(bank))
        return [parts[i] for i in range(len(bank.shards))]

    return run


# -- analysis at scale: maximizing natural images over a bank ----------------------------------------
def _rank_chunk_task(model_dirs, bank_dir, first, stop, top_k, params_dict):
    """Rank bank images [first, stop) by the outputs of the models saved in ``model_dirs``."""
    from farm.analysis.natural import NaturalParams, rank_natural_images
    from farm.data.images import ImageBank
    from farm.models.compact import load_compact

    init_task()
    models = [load_compact(d) for d in model_dirs]
    ids = np.arange(first, stop)
    images = ImageBank(bank_dir).read(ids)
    params = NaturalParams(**params_dict) if params_dict else NaturalParams()
    return rank_natural_images(models, [(ids.astype(str), images)], top_k=top_k, params=params)


def rank_bank_parallel(model_dirs: Sequence[str], bank_dir: str, top_k: int = 10, models_per_task: int = 8,
                       images_per_task: int = 10_000, params: dict | None = None, num_cpus: float = 1):
    """Maximizing natural images of many compact models over a whole image bank, as Ray tasks over
    (group of models) x (chunk of the bank); each task reads only its chunk, partial top-k lists are
    merged per group (``merge_topk``) and the groups joined (``concat_columns``). Equals ranking every
    image with every model at once.

    model_dirs: saved compact models (spec.json + state_dict.pt). bank_dir: an ImageBank folder.
    Returns a ``farm.analysis.natural.NaturalRanking`` whose columns follow ``model_dirs``.
    """
    import ray

    from farm.analysis.natural import concat_columns, merge_topk
    from farm.data.images import ImageBank

    n = len(ImageBank(bank_dir))
    chunks = [(a, min(a + images_per_task, n)) for a in range(0, n, images_per_task)]
    remote = ray.remote(_rank_chunk_task).options(num_cpus=num_cpus, max_retries=3)
    groups = [[str(d) for d in model_dirs[i:i + models_per_task]]
              for i in range(0, len(model_dirs), models_per_task)]
    refs = [[remote.remote(g, str(bank_dir), a, b, top_k, params or {}) for a, b in chunks] for g in groups]
    return concat_columns([merge_topk(ray.get(r)) for r in refs])

