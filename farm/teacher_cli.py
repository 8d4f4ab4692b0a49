"""``farm teacher train | import | evaluate | predict``: the teacher subcommands (CLI handlers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from farm.config import read_yaml, store_uri
from farm.models.input import check_images
from farm.teacher_sources import load_teacher_folder, write_teacher_ref
from farm.tracking import Tracker


def teacher_command(args) -> int:
    from farm.teacher_readout import evaluate_teacher
    from farm.teacher_training import run_teacher_training

    if args.teacher_cmd == "train":
        from farm.submit import check_paths_not_in_ray_job_copy

        # a plain `ray job submit` runs in a temporary copy of the working dir: refuse before training
        check_paths_not_in_ray_job_copy({"--out": args.out}, args.tracking_uri, store_uri(), "--tracking-uri")
        tracker = Tracker.open(args.tracking_uri or store_uri(), args.experiment)
        cfgd = read_yaml(args.config)
        run = tracker.start_job(f"teacher-{Path(args.out).resolve().name}-{int(time.time())}",
                                params={"config": json.dumps(cfgd, default=str)}, kind="teacher")
        step = {"n": 0}

        def cb(event, info):
            nums = {f"{event}.{k}": v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            tracker.log_metrics(run, nums, step=step["n"])
            step["n"] += 1
            print(f"[teacher] {event}: " + ", ".join(f"{k}={v:.4g}" for k, v in nums.items()))

        teacher, report = run_teacher_training(cfgd, args.data, args.out, callback=cb)
        tracker.client.set_tag(run, "farm.teacher_pretrained", str(teacher.pretrained).lower())
        if not teacher.pretrained:
            tracker.client.set_tag(run, "farm.warning", "random-init backbone: no ImageNet weights file given")
        tracker.log_artifacts(run, Path(args.out), "teacher")
        tracker.end_run(run)
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2))
        return 0
    if args.teacher_cmd == "import":
        ref = write_teacher_ref(args.out, args.kind, args.path, args.session)
        print(f"teacher reference ({len(json.loads(ref.read_text())['neuron_ids'])} neurons) -> {ref}")
        return 0
    if args.teacher_cmd == "predict":  # the images are checked before any teacher work
        images = _load_images(args.images)
    teacher = load_teacher_folder(args.teacher)
    if args.teacher_cmd == "evaluate":
        from farm.data.sessions import read_session

        s = read_session(args.session)
        print(json.dumps(evaluate_teacher(teacher, s, "second"), indent=2, default=float))
        return 0
    if args.teacher_cmd == "predict":
        from farm.files import atomic_path

        pred = teacher.predict(images)
        with atomic_path(args.out) as tmp, open(tmp, "wb") as f:  # no half-written file on failure
            np.save(f, pred)
        print(f"{images.shape[0]} images x {len(teacher.neuron_ids)} neurons -> {args.out}")
        return 0
    raise ValueError(f"unknown teacher command {args.teacher_cmd}")


def _load_images(path) -> np.ndarray:
    """Images for ``farm teacher predict``: uint8 RGB (N, H, W, 3), 0-255 (floats in [0, 1] are refused
    with a hint rather than read as near-black 0-255 images)."""
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array of images (uint8 RGB (N, H, W, 3), saved with "
                         f"np.save): {e}") from None
    if not isinstance(images, np.ndarray):  # an .npz archive
        raise ValueError(f"{path}: an .npz archive ({', '.join(images.files)}); give one .npy array of images, "
                         f"uint8 RGB (N, H, W, 3), saved with np.save")
    if images.dtype != np.uint8:
        floats01 = (np.issubdtype(images.dtype, np.floating) and images.size
                    and 0 <= float(images.min()) <= float(images.max()) <= 1)
        hint = " (these look like floats in [0, 1]: multiply by 255 and cast to uint8)" if floats01 else ""
        raise ValueError(f"{path}: images must be uint8 RGB (N, H, W, 3) with values 0-255, got dtype "
                         f"{images.dtype}{hint}")
    return check_images(images, str(path))
