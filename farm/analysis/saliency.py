"""Saliency by patch smoothing, and saliency-guided "smooth-" images (method.md §7.2).

A patch = the pixels within ``patch_radius`` of an integer centre (a disk). Smoothing a patch replaces
its pixels by those of the whole image blurred with a Gaussian of ``blur_sigma`` (then rounded to uint8,
so every image evaluated is a real uint8 image). The paper's patch radius and blur are unknown; the
defaults here (radius 7 px, sigma 3 px, centres every 4 px = the paper's 28x28 grid at 112 px) are our
choice: a patch about the size of one V4 feature at 112 px, blurred enough to remove its texture.

- ``saliency_map``: the response with a patch smoothed at each grid location; heat map = response
  minus the intact image's response (negative where the detail matters for the response).
- ``smooth_minus``: greedily smooth the non-overlapping patch that lowers the response most, ``n_patches``
  times, from a start image (the paper started from the maximizing natural image); controls smooth the
  same number of random non-overlapping patches. Only patches wholly inside the image are used, so every
  patch has the same pixel count and a control smooths exactly as many pixels as smooth-.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from farm.analysis.common import (check_images, check_output, check_size, eval_mode, gaussian_blur, model_device,
                                  to_model_input, zscore)
from farm.models.compact import CompactModel


@dataclass(frozen=True)
class SaliencyParams:
    """patch_radius: disk radius in pixels (default 7).
    blur_sigma: Gaussian sigma of the smoothing in pixels (default 3).
    stride: spacing of patch centres in pixels (default 4: a 28x28 grid at 112 px).
    n_patches: smooth- iterations = patches smoothed (default 10).
    n_controls: random-patch control images (default 10).
    seed: random controls.
    batch_size: images per forward pass.
    """

    patch_radius: float = 7.0
    blur_sigma: float = 3.0
    stride: int = 4
    n_patches: int = 10
    n_controls: int = 10
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        if not self.patch_radius > 0 or not self.blur_sigma > 0 or self.stride < 1:
            raise ValueError(f"SaliencyParams: need patch_radius > 0, blur_sigma > 0, stride >= 1; got "
                             f"{self.patch_radius}, {self.blur_sigma}, {self.stride}")
        if self.n_patches < 1 or self.n_controls < 0:
            raise ValueError(f"SaliencyParams: need n_patches >= 1, n_controls >= 0; got "
                             f"{self.n_patches}, {self.n_controls}")


@dataclass
class SaliencyResult:
    """image: uint8 (H, W, 3). centers_y, centers_x: int (Gy,), (Gx,) patch centres (pixels).
    responses: float64 (Gy, Gx) with the patch at (centers_y[i], centers_x[j]) smoothed.
    base_response: the intact image's response. heatmap: responses - base_response.
    zscored: (responses - mean) / sd with a neuron's normal-image statistics, or None."""

    image: np.ndarray
    centers_y: np.ndarray
    centers_x: np.ndarray
    responses: np.ndarray
    base_response: float
    heatmap: np.ndarray
    zscored: np.ndarray | None
    output: int
    params: SaliencyParams = field(default_factory=SaliencyParams)

    def summary(self) -> dict[str, float]:
        return {"saliency_base_response": float(self.base_response),
                "saliency_min_change": float(self.heatmap.min()),
                "saliency_max_change": float(self.heatmap.max())}


@dataclass
class SmoothMinusResult:
    """image: uint8 (H, W, 3) start image; smoothed: uint8 (H, W, 3) after the greedy smoothing.
    centers: int (P, 2) chosen patch centres (y, x) in order; trace: float64 (P + 1,) response before
    and after each patch. control_images: uint8 (C, H, W, 3); control_responses: float64 (C,).
    n_pixels: pixels smoothed in each image (the same in smooth- and every control)."""

    image: np.ndarray
    smoothed: np.ndarray
    centers: np.ndarray
    trace: np.ndarray
    control_images: np.ndarray
    control_responses: np.ndarray
    n_pixels: int
    output: int
    params: SaliencyParams = field(default_factory=SaliencyParams)

    @property
    def base_response(self) -> float:
        return float(self.trace[0])

    @property
    def response(self) -> float:
        return float(self.trace[-1])

    def summary(self) -> dict[str, float]:
        return {"smooth_minus_base": self.base_response, "smooth_minus_response": self.response,
                "smooth_minus_change": self.response - self.base_response,
                "smooth_random_change": float(np.mean(self.control_responses) - self.base_response)
                if len(self.control_responses) else float("nan")}


def blurred_image(image: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 (H, W, 3) blurred with a Gaussian of ``sigma`` px (scipy 'reflect' edges), rounded."""
    x = torch.as_tensor(image, dtype=torch.float64).permute(2, 0, 1)[None]
    y = gaussian_blur(x, sigma)[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _disk_masks(centers: np.ndarray, radius: float, size: tuple[int, int]) -> np.ndarray:
    """bool (P, H, W): pixels within ``radius`` of each (y, x) centre."""
    yy, xx = np.mgrid[:size[0], :size[1]]
    c = np.asarray(centers, np.float64).reshape(-1, 2)
    d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
    return d2 <= radius ** 2


@torch.no_grad()
def _masked_responses(model, image, blurred, masks, output, batch_size, dev) -> np.ndarray:
    """Responses to ``image`` with each mask's pixels taken from ``blurred``; masks (P, H, W) bool."""
    out = np.empty(len(masks))
    for s in range(0, len(masks), batch_size):
        m = masks[s:s + batch_size, :, :, None]
        imgs = np.where(m, blurred[None], image[None])
        out[s:s + batch_size] = model(to_model_input(imgs, model, dev))[:, output].double().cpu().numpy()
    return out


def _prepare(model, image, output, device, what):
    output = check_output(model, output)
    img = check_images(np.asarray(image)[None] if np.asarray(image).ndim == 3 else image, what)
    if len(img) != 1:
        raise ValueError(f"{what} must be one image (H, W, 3), got {len(img)} images")
    check_size(model, img, what)
    return output, img[0], model_device(model, device)


def grid_centers(size: int, stride: int) -> np.ndarray:
    """Integer patch centres stride//2, stride//2 + stride, ... < size."""
    return np.arange(stride // 2, size, stride)


def saliency_map(model: CompactModel, image: np.ndarray, params: SaliencyParams | None = None, output: int = 0,
                 normal_mean: float | None = None, normal_sd: float | None = None, device=None) -> SaliencyResult:
    """Heat map of the response with a smoothed patch at each grid location. image: uint8 (H, W, 3).

    normal_mean, normal_sd: the neuron's (model's) response mean and SD over normal images, to z-score
    the map as the paper did for V4 heat maps.
    """
    params = params or SaliencyParams()
    output, image, dev = _prepare(model, image, output, device, "saliency image")
    h, w = image.shape[:2]
    cy, cx = grid_centers(h, params.stride), grid_centers(w, params.stride)
    centers = np.stack(np.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)
    blurred = blurred_image(image, params.blur_sigma)
    with eval_mode(model):
        base = float(_masked_responses(model, image, blurred, np.zeros((1, h, w), bool), output, 1, dev)[0])
        resp = np.empty(len(centers))
        chunk = 1024  # masks for 1024 centres at 112 px: 13 MB
        for s in range(0, len(centers), chunk):
            masks = _disk_masks(centers[s:s + chunk], params.patch_radius, (h, w))
            resp[s:s + chunk] = _masked_responses(model, image, blurred, masks, output, params.batch_size, dev)
    resp = resp.reshape(len(cy), len(cx))
    return SaliencyResult(image=image, centers_y=cy, centers_x=cx, responses=resp, base_response=base,
                          heatmap=resp - base, zscored=zscore(resp, normal_mean, normal_sd), output=output,
                          params=params)


def _interior_centers(h: int, w: int, params: SaliencyParams) -> np.ndarray:
    r = int(np.ceil(params.patch_radius))
    cy = [c for c in grid_centers(h, params.stride) if r <= c <= h - 1 - r]
    cx = [c for c in grid_centers(w, params.stride) if r <= c <= w - 1 - r]
    if not cy or not cx:
        raise ValueError(f"no patch of radius {params.patch_radius} fits wholly inside a {h}x{w} image")
    return np.stack(np.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)


def _free(candidates: np.ndarray, chosen: list, radius: float) -> np.ndarray:
    """Mask of candidates whose disk does not overlap any chosen disk (centre distance > 2 radius)."""
    ok = np.ones(len(candidates), dtype=bool)
    for c in chosen:
        ok &= ((candidates - c) ** 2).sum(1) > (2 * radius) ** 2
    return ok


def smooth_minus(model: CompactModel, image: np.ndarray, params: SaliencyParams | None = None, output: int = 0,
                 device=None) -> SmoothMinusResult:
    """Greedy saliency-guided smoothing that lowers the response, with random-patch controls."""
    params = params or SaliencyParams()
    output, image, dev = _prepare(model, image, output, device, "smooth_minus image")
    h, w = image.shape[:2]
    blurred = blurred_image(image, params.blur_sigma)
    candidates = _interior_centers(h, w, params)
    masks = _disk_masks(candidates, params.patch_radius, (h, w))
    chosen: list[np.ndarray] = []
    current = np.zeros((h, w), dtype=bool)
    with eval_mode(model):
        trace = [float(_masked_responses(model, image, blurred, current[None], output, 1, dev)[0])]
        for _ in range(params.n_patches):
            free = np.flatnonzero(_free(candidates, chosen, params.patch_radius))
            if len(free) == 0:
                break
            resp = _masked_responses(model, image, blurred, masks[free] | current[None], output,
                                     params.batch_size, dev)
            best = free[int(np.argmin(resp))]
            chosen.append(candidates[best])
            current |= masks[best]
            trace.append(float(resp.min()))
        rng = np.random.default_rng(params.seed)
        control_masks = []
        for _ in range(params.n_controls):
            picked: list[np.ndarray] = []
            cmask = np.zeros((h, w), dtype=bool)
            while len(picked) < len(chosen):
                free = np.flatnonzero(_free(candidates, picked, params.patch_radius))
                if len(free) == 0:
                    break
                i = int(rng.choice(free))
                picked.append(candidates[i])
                cmask |= masks[i]
            if len(picked) == len(chosen):  # same pixel count only with as many whole patches
                control_masks.append(cmask)
        control_masks = np.asarray(control_masks, dtype=bool).reshape(-1, h, w)
        control_resp = _masked_responses(model, image, blurred, control_masks, output, params.batch_size, dev)
    control_images = np.where(control_masks[..., None], blurred[None], image[None]).astype(np.uint8)
    return SmoothMinusResult(
        image=image, smoothed=np.where(current[..., None], blurred, image).astype(np.uint8),
        centers=np.asarray(chosen, dtype=np.int64).reshape(-1, 2), trace=np.asarray(trace),
        control_images=control_images, control_responses=control_resp, n_pixels=int(current.sum()),
        output=output, params=params)
