"""A shared student's layer-2 activations on the bank, computed once for all of a job's neurons.

``farm.specialize`` fits each neuron's own layers 3-4 on the shared student's FROZEN layer-2
activations of the bank images (and their mirrors): the same array for every neuron. Computed inside
each neuron's task, that array cost most of a specialization (48,000 images through layers 0-2 at
112 px) and held 3.7-5.3 GB per task. Here it is computed once per job, written to one .npy file
(float32, (N, R, R, K2): channels-last, the layout the late layers train fastest on), and each task
memory-maps it: no recomputation, and the page cache holds one copy for all tasks on a node.

    info = save_early_features(shared, images, path, flip=True)   # once (atomic: complete or absent)
    a2 = load_early_features(path, n_images=len(images), flip=True, shared=shared)  # in each task

Each specialization's first step, the shared student's own map of its neuron (layers 3-4 and that
neuron's mixing on every activation: ~40 of a 35-filter start's ~300 CPU-s), is also the same
computation for every neuron up to the mixing: ``save_neuron_maps`` runs layers 3-4 once for all of
a job's neurons and writes one map file per neuron, which its task memory-maps (``load_neuron_map``).

    save_neuron_maps(shared, a2, ["190923:3", "190923:4"], [dir / "190923_3.npy", dir / "190923_4.npy"])
    t = load_neuron_map(dir / "190923_3.npy", n_maps=len(a2), shared=shared)   # (2N, R, R)

Plain PyTorch/NumPy.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from farm.files import atomic_path
from farm.models.compact import CompactModel

FORMAT = "farm-early-features"
VERSION = 1
MAPS_FORMAT = "farm-neuron-maps"


def early_key(shared: CompactModel, images: np.ndarray, flip: bool) -> str:
    """A content hash of what the activations depend on: the shared student's layers 0-2 (spec and
    weights), the images (shape and bytes) and ``flip``."""
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps({"format": FORMAT, "version": VERSION, "filters": list(shared.spec.filters[:3]),
                         "image_size": shared.spec.image_size, "flip": bool(flip),
                         "shape": list(images.shape), "dtype": str(images.dtype)}, sort_keys=True).encode())
    _hash_weights(h, shared, ("layer0", "layer1", "layer2"))
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def _hash_weights(h, model: CompactModel, prefixes: tuple[str, ...]) -> None:
    """Feed ``h`` the names and float64 bytes of ``model``'s tensors whose names start with ``prefixes``."""
    for name, t in model.state_dict().items():
        if name.startswith(prefixes):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())


def _shape(shared: CompactModel, n_images: int, flip: bool) -> tuple[int, int, int, int]:
    r = shared.spatial.shape[-1]
    return n_images * (2 if flip else 1), r, r, int(shared.spec.filters[2])


def save_early_features(shared: CompactModel, images: np.ndarray, path: str | Path, flip: bool = False,
                        batch_size: int = 128) -> dict:
    """Write the layer-2 activations of ``images`` (then, ``flip``, of their mirrors) to ``path``
    (.npy, float32 (N or 2N, R, R, K2)), batch by batch into the file itself (the peak memory is a
    batch). Atomic: a crash leaves no file. Returns {seconds, cpu_seconds, shape}."""
    from farm.specialize import _activations

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != shared.spec.image_size:
        raise ValueError(f"save_early_features: images must be (N, {shared.spec.image_size}, "
                         f"{shared.spec.image_size}, 3), got {images.shape}")
    t0, c0 = time.perf_counter(), time.process_time()
    shape = _shape(shared, len(images), flip)
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        _activations(shared, images, 2, batch_size, flip=flip, out=torch.from_numpy(mm).permute(0, 3, 1, 2))
        mm.flush()
        del mm
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "shape": list(shape)}


def load_early_features(path: str | Path, n_images: int, flip: bool, shared: CompactModel) -> torch.Tensor:
    """The activations ``save_early_features`` wrote, memory-mapped (nothing is read until used), as
    a float32 (N or 2N, K2, R, R) tensor in channels-last layout. Raises ValueError naming the file
    when it is missing or its shape does not fit ``n_images``, ``flip`` and ``shared``."""
    path = Path(path)
    want = _shape(shared, n_images, flip)
    try:
        mm = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, the file is never changed
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable early-features .npy file ({e})") from e
    if mm.dtype != np.float32 or tuple(mm.shape) != want:
        raise ValueError(f"{path}: early features of shape {tuple(mm.shape)} ({mm.dtype}); expected {want} "
                         f"float32 for {n_images} images{' and their mirrors' if flip else ''} and this "
                         f"shared model")
    return torch.from_numpy(mm).permute(0, 3, 1, 2)


def maps_key(shared: CompactModel, early: str) -> str:
    """A content hash of what the neurons' maps depend on: the layer-2 activations (their
    ``early_key``) and the shared student's layers 3-4 and mixing (spec and weights)."""
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps({"format": MAPS_FORMAT, "version": VERSION, "early": early,
                         "filters": list(shared.spec.filters[3:])}, sort_keys=True).encode())
    _hash_weights(h, shared, ("layer3", "layer4", "mixing"))
    return h.hexdigest()


def save_neuron_maps(shared: CompactModel, early: torch.Tensor, neuron_ids: list[str],
                     paths: list[str | Path], batch_size: int = 256) -> dict:
    """Write the shared student's map of each of ``neuron_ids`` (``farm.specialize.neuron_map``, from
    the layer-2 activations ``early``, (M, K2, R, R)) to its path in ``paths`` (.npy, float32 (M, R,
    R)): layers 3-4 run once per batch for all of them. Atomic per file: each appears complete or
    not at all.
    Returns {seconds, cpu_seconds, shape, n_neurons}."""
    import contextlib

    from farm.specialize import _late_maps

    if len(neuron_ids) != len(paths):
        raise ValueError(f"save_neuron_maps: {len(neuron_ids)} neuron ids but {len(paths)} paths")
    unknown = [n for n in neuron_ids if n not in shared.spec.neuron_ids]
    if unknown or shared.spec.readout != "factorized":
        raise ValueError(f"save_neuron_maps: needs a factorized shared model with outputs {unknown or neuron_ids}, "
                         f"got a {shared.spec.readout} one with outputs {list(shared.spec.neuron_ids[:3])}...")
    t0, c0 = time.perf_counter(), time.process_time()
    r = shared.spatial.shape[-1]
    shape = (len(early), r, r)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        mms = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=shape) for t in tmps]
        _late_maps(shared, [shared.spec.neuron_ids.index(n) for n in neuron_ids], early,
                   [torch.from_numpy(mm) for mm in mms], batch_size)
        for mm in mms:
            mm.flush()
        del mms
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "shape": list(shape),
            "n_neurons": len(neuron_ids)}


def load_neuron_map(path: str | Path, n_maps: int, shared: CompactModel) -> torch.Tensor:
    """A map ``save_neuron_maps`` wrote, memory-mapped, as a float32 (n_maps, R, R) tensor. Raises
    ValueError naming the file when it is missing or its shape does not fit ``n_maps`` and ``shared``."""
    path = Path(path)
    r = shared.spatial.shape[-1]
    try:
        mm = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable neuron-map .npy file ({e})") from e
    if mm.dtype != np.float32 or tuple(mm.shape) != (n_maps, r, r):
        raise ValueError(f"{path}: a neuron map of shape {tuple(mm.shape)} ({mm.dtype}); expected "
                         f"{(n_maps, r, r)} float32 (one map per layer-2 activation of this shared model)")
    return torch.from_numpy(mm)
