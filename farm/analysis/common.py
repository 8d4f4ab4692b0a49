"""Helpers shared by the analyses: image checks, batched predictions, Gaussian blur, result I/O.

Conventions of every analysis in ``farm.analysis``:

- images at rest are uint8 RGB (N, H, W, 3); inside models they are float32 NCHW recentered
  (raw 0-255 minus ``RGB_MEANS``, ``farm.data.images.recenter``).
- a model may have several outputs (a shared compact model); ``output`` picks the one analysed.
- models are run in eval mode (BN with running statistics); the caller's train/eval mode is restored.
- ``device=None`` runs where the model's parameters are; a device given moves the model there.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from farm.files import write_bytes_atomic
from farm.models.input import RGB_MEANS, check_size, eval_mode, predict, recenter  # noqa: F401 (used by the analyses)
from farm.models.compact import CompactModel


def check_images(images, what: str) -> np.ndarray:
    """``images`` as a uint8 (N, H, W, 3) array; ValueError naming ``what`` otherwise."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 RGB images (N, H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (raw 0-255 pixels), got dtype {a.dtype}")
    if len(a) == 0:
        raise ValueError(f"{what} is empty (0 images)")
    return a


def check_output(model: CompactModel, output: int) -> int:
    n = model.spec.n_outputs
    if not 0 <= int(output) < n:
        raise ValueError(f"output must be in 0..{n - 1} (the model has {n} outputs), got {output}")
    return int(output)


def model_device(model: torch.nn.Module, device=None) -> torch.device:
    """The device to run on: ``device`` (the model is moved there, in place) or the model's own."""
    if device is None:
        return next(model.parameters()).device
    model.to(device)
    return torch.device(device)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def to_model_input(images: np.ndarray, model: CompactModel, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> recentered (N, 3, H, W) on ``device`` in the model's dtype."""
    return recenter(images, device).to(model_dtype(model))


def pixel_bounds(device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Recentered-space bounds (1, 3, 1, 1) that keep raw pixels in [0, 255] (method.md §7.1)."""
    means = torch.as_tensor(RGB_MEANS, device=device, dtype=dtype).view(1, 3, 1, 1)
    return -means, 255.0 - means


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), weights summing to 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _symmetric_index(n: int, radius: int, device) -> torch.Tensor:
    # scipy's 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a); np.pad handles radius > n
    return torch.as_tensor(np.pad(np.arange(n), radius, mode="symmetric"), device=device)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) over H and W, as ``scipy.ndimage.gaussian_filter`` with
    sigma (pixels) on the two spatial axes, mode 'reflect', truncate 4. sigma <= 0 returns x.

    Differentiable; the result has x's dtype and device.
    """
    if sigma <= 0:
        return x
    w = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=x.dtype, device=x.device)
    r = (len(w) - 1) // 2
    n, c, h, wd = x.shape
    y = x.index_select(2, _symmetric_index(h, r, x.device))
    y = F.conv2d(y.reshape(n * c, 1, h + 2 * r, wd), w.view(1, 1, -1, 1)).reshape(n, c, h, wd)
    y = y.index_select(3, _symmetric_index(wd, r, x.device))
    y = F.conv2d(y.reshape(n * c, 1, h, wd + 2 * r), w.view(1, 1, 1, -1)).reshape(n, c, h, wd)
    return y


def zscore(values: np.ndarray, mean: float | None, sd: float | None) -> np.ndarray | None:
    """(values - mean) / sd, or None when mean/sd are not given (e.g. V4 heat-map normalization)."""
    if mean is None or sd is None:
        return None
    if not sd > 0:
        raise ValueError(f"z-scoring needs sd > 0, got {sd}")
    return (np.asarray(values, np.float64) - mean) / sd


# ---------------------------------------------------------------------------------------------------
# results: parameters, scalar summaries and arrays for the caller's logging
# ---------------------------------------------------------------------------------------------------

def result_arrays(result) -> dict[str, np.ndarray]:
    """Every numpy-array field of an analysis result dataclass, by field name."""
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
            if isinstance(getattr(result, f.name), np.ndarray)}


def result_params(result) -> dict:
    """The parameters an analysis result was computed with, flattened to {name: value}."""
    p = getattr(result, "params", None)
    if p is None:
        return {}
    d = dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(p)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def save_result_npz(result, path: str | os.PathLike) -> Path:
    """Write ``result_arrays(result)`` to an .npz file, atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in result_arrays(result).items() if v.dtype != object}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return path
