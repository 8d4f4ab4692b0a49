"""Adversarial images: small pixel changes of a base image that raise or lower the response (method.md §7.2).

The paper ascends ("adversarial+") or descends ("adversarial-") the model output from a base image and
stops when the pixel difference from the base passes a threshold; its norm and value are not known.
Here (our choice, documented):

- distance = the RMS pixel difference from the base in raw 0-255 intensity levels over all pixels and
  channels (``norm="rms"``, i.e. L2 / sqrt(H*W*3)), or the largest absolute difference (``norm="linf"``);
- budget default 5 intensity levels (RMS 5 ~ PSNR 34 dB: visibly the same image);
- steps of ``budget / 20`` in that norm along the gradient (RMS-normalized for "rms", its sign for
  "linf"), raw pixels clipped to [0, 255] after each step; an image stops at the first step whose
  distance reaches the budget, projected back onto it (scaled toward the base for "rms", clamped for
  "linf"), so the final distance equals the budget;
- the returned uint8 image rounds the change to whole levels; where rounding would exceed the budget
  it truncates the change toward the base (never farther than the float image, in either norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from farm.analysis.common import (check_images, check_output, check_size, eval_mode, gaussian_blur,
                                  model_device, pixel_bounds, predict, to_model_input)
from farm.models.compact import CompactModel


@dataclass(frozen=True)
class AdversarialParams:
    """direction: "max" (adversarial+) or "min" (adversarial-).
    norm: "rms" (root-mean-square pixel change, raw levels) or "linf" (largest pixel change).
    budget: the distance at which an image stops, raw 0-255 levels (default 5).
    step_fraction: step length as a fraction of the budget (default 1/20).
    max_steps: give up after this many steps (an image whose gradient vanishes never gets there).
    grad_blur_sigma: optional Gaussian blur of the gradient (pixels); 0 = off.
    """

    direction: str = "max"
    norm: str = "rms"
    budget: float = 5.0
    step_fraction: float = 0.05
    max_steps: int = 200
    grad_blur_sigma: float = 0.0

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"AdversarialParams.direction must be 'max' or 'min', got {self.direction!r}")
        if self.norm not in ("rms", "linf"):
            raise ValueError(f"AdversarialParams.norm must be 'rms' or 'linf', got {self.norm!r}")
        if not self.budget > 0 or not 0 < self.step_fraction <= 1 or self.max_steps < 1:
            raise ValueError(f"AdversarialParams: need budget > 0, 0 < step_fraction <= 1, max_steps >= 1; "
                             f"got {self.budget}, {self.step_fraction}, {self.max_steps}")


@dataclass
class AdversarialResult:
    """base_images, images: uint8 (N, H, W, 3); base_responses, responses: float64 (N,) model outputs
    for the uint8 images; distances: float64 (N,) distance of each uint8 image from its base in the
    chosen norm (raw levels, <= budget); reached: bool (N,) whether the budget was reached;
    steps: int (N,) steps taken."""

    base_images: np.ndarray
    images: np.ndarray
    base_responses: np.ndarray
    responses: np.ndarray
    distances: np.ndarray
    reached: np.ndarray
    steps: np.ndarray
    output: int
    params: AdversarialParams = field(default_factory=AdversarialParams)

    @property
    def response_change(self) -> np.ndarray:
        return self.responses - self.base_responses

    def summary(self) -> dict[str, float]:
        tag = "plus" if self.params.direction == "max" else "minus"
        return {f"adversarial_{tag}_mean_change": float(self.response_change.mean()),
                f"adversarial_{tag}_mean_base": float(self.base_responses.mean()),
                f"adversarial_{tag}_mean_response": float(self.responses.mean()),
                f"adversarial_{tag}_mean_distance": float(self.distances.mean())}


def pixel_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, norm: str = "rms") -> np.ndarray:
    """Distance per image between two image stacks (N, ...) in raw levels: "rms" or "linf"."""
    d = torch.as_tensor(np.asarray(a, np.float64) if not isinstance(a, torch.Tensor) else a, dtype=torch.float64) \
        - torch.as_tensor(np.asarray(b, np.float64) if not isinstance(b, torch.Tensor) else b, dtype=torch.float64)
    d = d.flatten(1)
    if norm == "rms":
        return d.pow(2).mean(1).sqrt().numpy()
    if norm == "linf":
        return d.abs().amax(1).numpy()
    raise ValueError(f"norm must be 'rms' or 'linf', got {norm!r}")


def _dist(delta: torch.Tensor, norm: str) -> torch.Tensor:
    d = delta.flatten(1)
    return d.pow(2).mean(1).sqrt() if norm == "rms" else d.abs().amax(1)


def _project(delta: torch.Tensor, norm: str, budget: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-budget, budget)
    scale = (budget / _dist(delta, norm).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, 1, 1, 1)


def _to_uint8(base_raw: np.ndarray, delta_raw: np.ndarray, norm: str, budget: float) -> np.ndarray:
    """base uint8 + delta, rounded; per image falls back to truncation toward the base if over budget."""
    rounded = np.clip(base_raw.astype(np.float64) + np.rint(delta_raw), 0, 255)
    truncated = np.clip(base_raw.astype(np.float64) + np.trunc(delta_raw), 0, 255)
    over = pixel_distance(rounded, base_raw, norm) > budget
    out = np.where(over.reshape(-1, 1, 1, 1), truncated, rounded)
    return out.astype(np.uint8)


def adversarial_images(model: CompactModel, base_images: np.ndarray, params: AdversarialParams | None = None,
                       output: int = 0, device=None, batch_size: int = 64) -> AdversarialResult:
    """Adversarial+ ("max") or adversarial- ("min") versions of each base image (uint8 (N, H, W, 3))."""
    params = params or AdversarialParams()
    output = check_output(model, output)
    base_images = check_images(base_images, "base_images")
    check_size(model, base_images, "base_images")
    dev = model_device(model, device)
    sign = 1.0 if params.direction == "max" else -1.0
    step = params.budget * params.step_fraction
    n = len(base_images)
    deltas = np.zeros(base_images.shape[:1] + (3,) + base_images.shape[1:3], dtype=np.float64)
    reached = np.zeros(n, dtype=bool)
    steps = np.zeros(n, dtype=np.int64)
    with eval_mode(model):
        for s in range(0, n, batch_size):
            base = to_model_input(base_images[s:s + batch_size], model, dev)
            lo, hi = pixel_bounds(dev, base.dtype)
            delta = torch.zeros_like(base)
            active = torch.ones(len(base), dtype=torch.bool, device=dev)
            n_steps = torch.zeros(len(base), dtype=torch.long, device=dev)
            for _ in range(params.max_steps):
                if not bool(active.any()):
                    break
                x = (base + delta).requires_grad_(True)
                (g,) = torch.autograd.grad(model(x)[:, output].sum(), x)
                with torch.no_grad():
                    g = gaussian_blur(g, params.grad_blur_sigma)
                    if params.norm == "rms":
                        g = g / g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
                    else:
                        g = g.sign()
                    new = delta + sign * step * g
                    new = torch.maximum(torch.minimum(base + new, hi), lo) - base
                    done = _dist(new, params.norm) >= params.budget
                    new = torch.where(done.view(-1, 1, 1, 1), _project(new, params.norm, params.budget), new)
                    delta = torch.where(active.view(-1, 1, 1, 1), new, delta)
                    n_steps += active.long()
                    active &= ~done
            deltas[s:s + batch_size] = delta.double().cpu().numpy()
            reached[s:s + batch_size] = (~active).cpu().numpy()
            steps[s:s + batch_size] = n_steps.cpu().numpy()
    images = _to_uint8(base_images, deltas.transpose(0, 2, 3, 1), params.norm, params.budget)
    return AdversarialResult(
        base_images=base_images, images=images,
        base_responses=predict(model, base_images, output=output, device=dev, dtype=np.float64),
        responses=predict(model, images, output=output, device=dev, dtype=np.float64),
        distances=pixel_distance(images, base_images, params.norm), reached=reached, steps=steps,
        output=output, params=params)

