"""Maximizing (and minimizing) synthesized images by gradient ascent (method.md §7.1).

The paper's procedure, per image:
  init: raw pixels uniform in [128, 178) per pixel and channel (colour noise), then recentered;
  every step: g = d(output)/d(image); g /= sqrt(mean(g^2)) + 1e-5; g = Gaussian blur of g (sigma 1 px);
    image += step_size * g ("max") or -= ("min"); clip to raw [0, 255]; keep the best image so far;
  every ``image_blur_every`` steps (step > 0, after the best-so-far check): blur the image (sigma 1 px).
The output is the best image (raw, clipped to 0-255) and its response. No jitter or other regularizer.

Differences from the paper's code, all deliberate:
- restarts run as one batch (BN is in eval mode, so the images do not interact);
- the "best so far" starts at -inf ("max") / +inf ("min"), not at 0 / 1e5;
- the returned images are rounded to uint8 and their responses are those of the uint8 images (what
  would be shown to an animal); ``float_responses`` holds the responses before rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from farm.analysis.common import (check_output, eval_mode, gaussian_blur, model_device, model_dtype,
                                  pixel_bounds, predict)
from farm.models.input import RGB_MEANS, uncenter
from farm.models.compact import CompactModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthParams:
    """direction: "max" or "min".
    n_steps: gradient steps per image (paper code default 1000; its figure script used 100).
    n_restarts: independent random initializations (images returned).
    step_size: step in recentered pixel units per RMS-normalized gradient (paper: 10).
    grad_blur_sigma, image_blur_sigma: Gaussian sigmas in pixels (paper: 1 and 1).
    image_blur_every: blur the image every this many steps (paper: 50); 0 = never.
    init_low, init_range: raw init uniform in [init_low, init_low + init_range). Default: full-range
      noise (0, 255). The paper's narrow grey init (128, 50) can leave a small compact model where its
      units are off and the ascent barely moves (benchmarks/synth_init.py on the demo's 16 models,
      100 steps x 9 restarts: with (128, 50) 4 stayed below their mean natural-image response and 10
      beat their best bank image; with (0, 255) none stayed below and 14 beat it; see
      benchmarks/README.md). Pass (128, 50) for the paper's.
    grayscale: force the image to grey (channel mean) after every step (paper: optional, off).
    seed: random initialization.
    """

    direction: str = "max"
    n_steps: int = 1000
    n_restarts: int = 1
    step_size: float = 10.0
    grad_blur_sigma: float = 1.0
    image_blur_sigma: float = 1.0
    image_blur_every: int = 50
    init_low: float = 0.0
    init_range: float = 255.0
    grayscale: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"SynthParams.direction must be 'max' or 'min', got {self.direction!r}")
        if self.n_steps < 1 or self.n_restarts < 1:
            raise ValueError(f"SynthParams: n_steps and n_restarts must be >= 1, got "
                             f"{self.n_steps}, {self.n_restarts}")
        if self.image_blur_every < 0:
            raise ValueError(f"SynthParams.image_blur_every must be >= 0, got {self.image_blur_every}")


@dataclass
class SynthResult:
    """images: uint8 (n_restarts, H, W, 3), the best image of each restart.
    responses: float64 (n_restarts,), model output for each uint8 image.
    float_responses: float64 (n_restarts,), best output found during the ascent (before rounding).
    traces: float64 (n_restarts, n_steps), output after every step.
    """

    images: np.ndarray
    responses: np.ndarray
    float_responses: np.ndarray
    traces: np.ndarray
    output: int
    params: SynthParams = field(default_factory=SynthParams)

    def best_index(self) -> int:
        return int(np.argmax(self.responses) if self.params.direction == "max" else np.argmin(self.responses))

    def summary(self) -> dict[str, float]:
        p = self.params.direction
        return {f"synth_{p}_best": float(self.responses[self.best_index()]),
                f"synth_{p}_mean": float(np.mean(self.responses))}


def _grey(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    raw = x - lo  # lo = -means
    return raw.mean(dim=1, keepdim=True).expand_as(raw) + lo


def synthesize(model: CompactModel, params: SynthParams | None = None, output: int = 0,
               device=None) -> SynthResult:
    """Images that maximize (or minimize) ``model``'s output ``output`` (method.md §7.1).

    Returns a SynthResult with ``params.n_restarts`` images of the model's input size.
    """
    params = params or SynthParams()
    output = check_output(model, output)
    dev = model_device(model, device)
    dtype = model_dtype(model)
    size = model.spec.image_size
    sign = 1.0 if params.direction == "max" else -1.0
    lo, hi = pixel_bounds(dev, dtype)
    gen = torch.Generator().manual_seed(int(params.seed))
    raw = torch.rand((params.n_restarts, 3, size, size), generator=gen, dtype=torch.float64)
    raw = raw * params.init_range + params.init_low
    x = (raw - torch.as_tensor(RGB_MEANS, dtype=torch.float64).view(1, 3, 1, 1)).to(dev, dtype)
    x = torch.maximum(torch.minimum(x, hi), lo)

    best_x = x.clone()
    best_r = torch.full((params.n_restarts,), -np.inf * sign, dtype=torch.float64, device=dev)
    traces = np.empty((params.n_restarts, params.n_steps))
    with eval_mode(model):
        for step in range(params.n_steps):
            x.requires_grad_(True)
            y = model(x)[:, output]
            (g,) = torch.autograd.grad(y.sum(), x)
            x = x.detach()
            with torch.no_grad():
                rms = g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
                g = gaussian_blur(g / (rms + 1e-5), params.grad_blur_sigma)
                x = x + sign * params.step_size * g
                x = torch.maximum(torch.minimum(x, hi), lo)
                if params.grayscale:
                    x = _grey(x, lo, hi)
                r = model(x)[:, output].double()
                traces[:, step] = r.cpu().numpy()
                better = r > best_r if sign > 0 else r < best_r
                best_r = torch.where(better, r, best_r)
                best_x[better] = x[better]
                if params.image_blur_every and step > 0 and step % params.image_blur_every == 0:
                    x = gaussian_blur(x, params.image_blur_sigma)
    images = uncenter(best_x)
    responses = predict(model, images, output=output, device=dev, dtype=np.float64)
    log.debug("synthesize(%s): best %s", params.direction, responses)
    return SynthResult(images=images, responses=responses, float_responses=best_r.cpu().numpy(),
                       traces=traces, output=output, params=params)
