"""The model input: images at rest are uint8 RGB (N, H, W, 3); models take float32 NCHW
"recentered" input: raw 0-255 minus the per-channel RGB means of the paper's distillation set
(method.md §1.3-§1.4), no scaling. ``recenter`` and ``uncenter`` convert between the two.
"""

from __future__ import annotations

import warnings

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
