"""The model input and running a model on it: images at rest are uint8 RGB (N, H, W, 3); models
take float32 NCHW "recentered" input: raw 0-255 minus the per-channel RGB means of the paper's
distillation set (method.md §1.3-§1.4), no scaling. ``recenter`` and ``uncenter`` convert between
the two; ``predict`` is THE way to run a model (compact, shared or any module with that input) on
images, in eval mode, its own mode restored (``eval_mode``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import numpy as np
import torch

#: Per-channel means (R, G, B) of the paper's 12 M distillation images (method.md §1.3).
RGB_MEANS = np.array([116.222, 109.270, 100.381], dtype=np.float32)


def tensor_view(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory, also when ``a`` is read-only (arrays from Ray's object store
    are): callers only read it (indexing and arithmetic copy), so torch's non-writable warning is
    noise there."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def recenter(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W) raw minus RGB_MEANS, on ``device``."""
    x = images if isinstance(images, torch.Tensor) else tensor_view(np.asarray(images))
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    x = x - torch.as_tensor(RGB_MEANS, device=device)
    return x.permute(0, 3, 1, 2).contiguous()


def uncenter(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Inverse of ``recenter``: float (N, 3, H, W) recentered -> uint8 (N, H, W, 3), clipped to 0-255."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    raw = x.transpose(0, 2, 3, 1) + RGB_MEANS
    return np.clip(np.rint(raw), 0, 255).astype(np.uint8)


def check_images(images, what: str) -> np.ndarray:
    """``images`` as an array when they are model input at rest (uint8 RGB (N, H, W, 3)), else a
    ValueError naming ``what``."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 RGB (N, H, W, 3), got dtype {a.dtype} shape {a.shape}")
    return a


def check_size(model: torch.nn.Module, images: np.ndarray, what: str) -> None:
    """ValueError when ``images`` are not the model's ``spec.image_size`` (models without a spec pass)."""
    spec = getattr(model, "spec", None)
    s = getattr(spec, "image_size", None)
    if s is not None and tuple(images.shape[1:3]) != (s, s):
        raise ValueError(f"{what} are {images.shape[1]}x{images.shape[2]} px but the model takes "
                         f"{s}x{s} (spec.image_size)")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` in eval mode (BN running statistics) and restore its train/eval state afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256,
            device: str | torch.device | None = None, *, output: int | None = None, dtype=np.float32) -> np.ndarray:
    """The model's outputs on uint8 images (N, H, W, 3), in eval mode -> ``dtype`` (N,) for
    ``output`` (an index) or, with ``output`` None, (N,) for a one-output model and (N, n_outputs)
    otherwise. ``device``: where to run (the model is moved there); default where its parameters
    are. The input is cast to the model's dtype."""
    images = check_images(images, "predict: images")
    check_size(model, images, "predict: images")
    p = next(model.parameters())
    dev = p.device if device is None else torch.device(device)
    if device is not None:
        model.to(dev)
    with eval_mode(model):
        out = [model(recenter(images[s:s + batch_size], dev).to(p.dtype)).cpu()
               for s in range(0, len(images), batch_size)]
    y = torch.cat(out).numpy().astype(dtype, copy=False)
    if output is not None:
        n = y.shape[1]
        if not -n <= int(output) < n:
            raise ValueError(f"predict: output {output} out of range for a model with {n} outputs")
        return y[:, int(output)]
    return y[:, 0] if y.shape[1] == 1 else y
