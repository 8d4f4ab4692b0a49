"""Images: resizing, the gaudy transform, synthetic stimuli and the image bank.

At rest images are uint8 RGB (N, H, W, 3). Models take float32 NCHW "recentered" input
(``farm.models.input.recenter``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from farm.files import atomic_path, read_manifest, write_text_atomic
from farm.dataclass_dict import from_dict

log = logging.getLogger(__name__)

from farm.models.input import RGB_MEANS  # noqa: E402  (the model input lives with the models)


# ---------------------------------------------------------------------------------------------------
# Basic operations on uint8 image batches
# ---------------------------------------------------------------------------------------------------

def _check_images(images, name: str = "images") -> np.ndarray:
    """Return ``images`` as a uint8 (N, H, W, 3) array or raise a ValueError naming ``name``."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name} must be (N, H, W, 3) RGB, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0-255), got dtype {a.dtype}")
    return a


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize every image with PIL bicubic (the paper's reader, method.md §1.2).

    images: uint8 (N, H, W, 3). size: side in pixels, or (height, width).
    Returns uint8 (N, height, width, 3); a copy even when the size is unchanged.
    """
    images = _check_images(images)
    h, w = (size, size) if np.isscalar(size) else size
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"resize(): size must be positive, got {size}")
    if images.shape[1:3] == (h, w):
        return images.copy()
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))
    return out


def gaussian_filter(x: np.ndarray, sigma: float, axes: Sequence[int], truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian smoothing of float ``x`` over ``axes`` (scipy.ndimage 'reflect' mode).

    sigma in pixels (0 returns a float copy); the kernel radius is int(truncate * sigma + 0.5), as
    scipy.ndimage.gaussian_filter does, so σ = 0.5 gives the 5-tap kernel of method.md §4.
    """
    out = np.array(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    if sigma <= 0:
        return out
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for ax in axes:
        n = out.shape[ax]
        pad = [(0, 0)] * out.ndim
        pad[ax] = (radius, radius)
        # numpy's 'symmetric' (edge sample repeated) is scipy's 'reflect'
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        window = [slice(None)] * out.ndim
        for k, t in enumerate(taps):
            window[ax] = slice(k, k + n)
            acc += out.dtype.type(t) * padded[tuple(window)]
        out = acc
    return out


def gaudy(images: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """The "gaudy" transform (method.md §1.5).

    Optional Gaussian pre-smoothing (``sigma`` pixels, 0 = none); then, per image and channel, pixels
    below that channel's mean become 0 and pixels at or above it become 255.
    images: uint8 (N, H, W, 3) -> uint8 (N, H, W, 3) with values in {0, 255} only.
    """
    images = _check_images(images)
    x = gaussian_filter(images.astype(np.float64), sigma, axes=(1, 2))
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.where(x >= means, 255, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Synthetic stimuli
# ---------------------------------------------------------------------------------------------------

#: Mean grey of the distillation images: recentered, it is (almost) zero input.
MEAN_GREY = tuple(int(round(float(v))) for v in RGB_MEANS)


def dots(size: int, centers, radii=3.0, colors=(255, 255, 255), background=MEAN_GREY) -> np.ndarray:
    """Images of filled discs on a uniform background, one image per entry of ``centers``.

    size: image side S in pixels.
    centers: length-N sequence; entry i is one (row, col) pair or a (D_i, 2) array of pairs (D_i may
        differ between images, and may be 0), in pixels; pixel (r, c) has its centre at (r, c).
    radii: pixels; a scalar for every dot, or a length-N sequence of scalars or (D_i,) arrays.
    colors: RGB 0-255; one colour for every dot, or a length-N sequence of colours or (D_i, 3) arrays.
    background: RGB 0-255 (default the mean grey, i.e. zero recentered input).
    A pixel belongs to a dot when its distance to the centre is <= the radius; later dots cover
    earlier ones. Returns uint8 (N, S, S, 3).
    """
    size = int(size)
    n = len(centers)
    radii_list = [radii] * n if _is_scalar(radii) else list(radii)
    if len(radii_list) != n:
        raise ValueError(f"dots(): radii has {len(radii_list)} entries for {n} images")
    # an RGB triple of numbers is one colour for every dot; anything else is one entry per image
    colors_list = [colors] * n if _is_color(colors) else list(colors)
    if len(colors_list) != n:
        raise ValueError(f"dots(): colors has {len(colors_list)} entries for {n} images")
    bg = np.broadcast_to(np.asarray(background, dtype=np.float64), (3,))
    rows = np.arange(size, dtype=np.float64)[:, None]
    cols = np.arange(size, dtype=np.float64)[None, :]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        c = np.asarray(centers[i], dtype=np.float64).reshape(-1, 2)
        d = len(c)
        r = np.broadcast_to(np.asarray(radii_list[i], dtype=np.float64), (d,)) if d else np.zeros(0)
        col = np.asarray(colors_list[i], dtype=np.float64)
        col = np.broadcast_to(col if col.ndim == 2 else col.reshape(1, 3), (d, 3)) if d else np.zeros((0, 3))
        img = np.empty((size, size, 3))
        img[:] = bg
        for (r0, c0), rad, rgb in zip(c, r, col):
            img[(rows - r0) ** 2 + (cols - c0) ** 2 <= rad * rad] = rgb
        out[i] = _to_uint8(img)
    return out


def _is_scalar(x) -> bool:
    return np.isscalar(x) or (isinstance(x, np.ndarray) and x.ndim == 0)


def _is_color(x) -> bool:
    return (isinstance(x, (list, tuple, np.ndarray)) and len(x) == 3 and all(_is_scalar(v) for v in x))


def random_dots(size: int, n: int, rng: np.random.Generator, max_dots: int = 6) -> np.ndarray:
    """n images of 1..max_dots random discs (radius 1 px to S/6, random colours) on random grey."""
    centers, radii, colors, backgrounds = [], [], [], []
    for _ in range(n):
        d = int(rng.integers(1, max_dots + 1))
        centers.append(rng.uniform(0, size - 1, (d, 2)))
        radii.append(rng.uniform(1.0, max(1.5, size / 6), d))
        colors.append(rng.integers(0, 256, (d, 3)))
        backgrounds.append(rng.integers(40, 216))
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = dots(size, [centers[i]], [radii[i]], [colors[i]], background=(backgrounds[i],) * 3)[0]
    return out


def gratings(size: int, n: int, rng: np.random.Generator, orientations=None, frequencies=None,
             phases=None, colors=None) -> np.ndarray:
    """Sinusoidal colour gratings, uint8 (n, S, S, 3).

    orientations: radians (n,), default uniform [0, π). frequencies: cycles per image (n,), default
    log-uniform [1, S/4]. phases: radians (n,), default uniform [0, 2π). colors: (n, 2, 3) RGB of the
    peak and trough, default two random colours. Pixel = trough + (peak - trough)(1 + sin)/2.
    """
    size, n = int(size), int(n)
    theta = rng.uniform(0, np.pi, n) if orientations is None else np.broadcast_to(orientations, (n,))
    freq = (np.exp(rng.uniform(0, np.log(max(size / 4, 1.0)), n)) if frequencies is None
            else np.broadcast_to(frequencies, (n,)))
    phase = rng.uniform(0, 2 * np.pi, n) if phases is None else np.broadcast_to(phases, (n,))
    cols = rng.integers(0, 256, (n, 2, 3)) if colors is None else np.broadcast_to(colors, (n, 2, 3))
    cols = np.asarray(cols, dtype=np.float64)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        u = x * np.cos(theta[i]) + y * np.sin(theta[i])
        s = 0.5 * (1 + np.sin(2 * np.pi * freq[i] * u + phase[i]))
        out[i] = _to_uint8(cols[i, 1] + (cols[i, 0] - cols[i, 1]) * s[..., None])
    return out


def _pink_fields(size: int, n: int, channels: int, rng: np.random.Generator,
                 exponent: float = 1.0, chunk: int = 256) -> np.ndarray:
    """(n, channels, S, S) float32 Gaussian noise fields with a 1/f^exponent amplitude spectrum,
    each standardized to mean 0, SD 1. Built in chunks so memory stays O(chunk)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = (f ** -exponent).astype(np.float32)
    amp[0, 0] = 0.0
    out = np.empty((n, channels, size, size), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        # complex white noise drawn directly in the Fourier domain saves the forward FFT
        coef = rng.standard_normal((m, channels, size, size // 2 + 1, 2), dtype=np.float32)
        spectrum = (coef[..., 0] + 1j * coef[..., 1]) * amp
        field_ = np.fft.irfft2(spectrum, s=(size, size)).astype(np.float32)
        field_ -= field_.mean(axis=(2, 3), keepdims=True)
        field_ /= field_.std(axis=(2, 3), keepdims=True) + 1e-12
        out[s:s + m] = field_
    return out


#: Luminance and two opponent colour directions: natural images vary mostly in luminance.
_COLOR_AXES = (np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])
               / np.sqrt([[3.0], [2.0], [1.5]])).astype(np.float32)


def _pink_float(size: int, n: int, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """Colour 1/f noise as float32 (n, S, S, 3) in 0-255 units (not clipped)."""
    fields = _pink_fields(size, n, 3, rng, exponent)  # (n, 3, S, S)
    weights = np.stack([np.ones(n), rng.uniform(0.1, 0.4, n), rng.uniform(0.1, 0.4, n)], axis=1)
    mixing = (weights[:, :, None] * _COLOR_AXES[None]).astype(np.float32)  # (n, 3 axes, 3 rgb)
    mix = np.matmul(fields.transpose(0, 2, 3, 1), mixing[:, None])
    mix /= mix.reshape(n, -1).std(axis=1)[:, None, None, None] + 1e-12
    contrast = rng.uniform(25, 55, n).astype(np.float32)[:, None, None, None]
    mean = rng.uniform(70, 170, (n, 1, 1, 3)).astype(np.float32)
    return mean + contrast * mix


def pink_noise(size: int, n: int, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """Colour 1/f noise images, uint8 (n, S, S, 3): luminance-dominated, random mean colour and
    contrast (SD 25-55 grey levels), amplitude spectrum ∝ 1/f^exponent."""
    return _to_uint8(_pink_float(int(size), int(n), rng, exponent))


def white_noise(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Independent uniform 0-255 pixels and channels, uint8 (n, S, S, 3)."""
    return rng.integers(0, 256, (int(n), int(size), int(size), 3), dtype=np.uint8)


def natural_like(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Generated "natural-like" images, uint8 (n, S, S, 3); no downloads.

    Each image: a colour 1/f^1.3 noise background; 0-2 edges (a half-plane recoloured); 1-4 textured
    shapes (ellipses, rectangles, convex polygons) of 10-50 % of the image side; 0-5 small dots;
    then a σ = 0.6 px blur so edges are not aliased. Structure is at every scale, like natural
    images, so a model's response depends on the image content and not on pixel noise.
    """
    size, n = int(size), int(n)
    # steeper than 1/f: smooth backgrounds, so the shapes and edges carry most of the structure
    base = _pink_float(size, n, rng, exponent=1.3)
    texture = _pink_fields(size, n, 1, rng)[:, 0, :, :, None]
    coords = np.arange(size, dtype=np.float32)

    def window(cy, cx, radius):
        """Row/col slices of the shape's bounding box and its local coordinate grids."""
        r0, r1 = max(int(cy - radius), 0), min(int(np.ceil(cy + radius)) + 1, size)
        c0, c1 = max(int(cx - radius), 0), min(int(np.ceil(cx + radius)) + 1, size)
        return (slice(r0, r1), slice(c0, c1)), coords[r0:r1, None] - cy, coords[None, c0:c1] - cx

    for i in range(n):
        img, tex = base[i], texture[i]
        for _ in range(int(rng.integers(0, 3))):
            angle = rng.uniform(0, 2 * np.pi)
            y0, x0 = rng.uniform(0.2 * size, 0.8 * size, 2)
            mask = (np.cos(angle) * (coords[None, :] - x0) + np.sin(angle) * (coords[:, None] - y0)) >= 0
            shift = rng.uniform(-80, 80) + rng.uniform(-25, 25, 3)
            img[mask] += shift.astype(np.float32)
        for _ in range(int(rng.integers(1, 5))):
            kind = rng.integers(0, 3)
            cy, cx = rng.uniform(0, size, 2)
            a, b = rng.uniform(0.05 * size, 0.25 * size, 2)
            angle = rng.uniform(0, np.pi)
            box, dy, dx = window(cy, cx, np.hypot(a, b))
            u = np.cos(angle) * dx + np.sin(angle) * dy
            v = -np.sin(angle) * dx + np.cos(angle) * dy
            if kind == 0:
                mask = (u / a) ** 2 + (v / b) ** 2 <= 1
            elif kind == 1:
                mask = (np.abs(u) <= a) & (np.abs(v) <= b)
            else:
                k = int(rng.integers(3, 7))
                t = np.sort(rng.uniform(0, 2 * np.pi, k))
                pu, pv = a * np.cos(t), b * np.sin(t)
                mask = np.ones(u.shape, dtype=bool)
                for j in range(k):
                    du, dv = pu[(j + 1) % k] - pu[j], pv[(j + 1) % k] - pv[j]
                    mask &= du * (v - pv[j]) - dv * (u - pu[j]) >= 0
            color = rng.uniform(0, 255, 3).astype(np.float32)
            opacity = np.float32(rng.uniform(0.7, 1.0))
            region, fill = img[box], color + np.float32(rng.uniform(0, 30)) * tex[box]
            region[mask] = (1 - opacity) * region[mask] + opacity * fill[mask]
        for _ in range(int(rng.integers(0, 6))):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(1.0, max(1.5, size / 16))
            box, dy, dx = window(cy, cx, r)
            img[box][dy ** 2 + dx ** 2 <= r * r] = rng.uniform(0, 255, 3)
    return _to_uint8(gaussian_filter(base, 0.6, axes=(1, 2)))


def augment(images: np.ndarray, rng: np.random.Generator, crop_scale: tuple[float, float] = (0.7, 1.0),
            flip: bool = True, jitter: float = 0.1, size: int | None = None) -> np.ndarray:
    """Random square crops resized back (PIL bicubic), horizontal flips and colour jitter.

    images: uint8 (N, H, W, 3). crop_scale: range of the crop side as a fraction of min(H, W).
    flip: flip each image left-right with probability 1/2. jitter: brightness, contrast and
    saturation factors drawn uniformly from [1 - jitter, 1 + jitter]. size: output side (default
    min(H, W)). Returns uint8 (N, size, size, 3); the same rng state gives the same output.
    """
    images = _check_images(images)
    n, h, w, _ = images.shape
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"augment(): crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    if jitter < 0 or jitter >= 1:
        raise ValueError(f"augment(): jitter must be in [0, 1), got {jitter}")
    out_size = int(size) if size is not None else min(h, w)
    side = rng.uniform(lo, hi, n) * min(h, w)
    y0 = rng.uniform(0, 1, n) * (h - side)
    x0 = rng.uniform(0, 1, n) * (w - side)
    flips = rng.random(n) < 0.5
    factors = rng.uniform(1 - jitter, 1 + jitter, (n, 3))
    gray_weights = np.array([0.299, 0.587, 0.114])
    out = np.empty((n, out_size, out_size, 3), dtype=np.uint8)
    for i in range(n):
        box = (float(x0[i]), float(y0[i]), float(x0[i] + side[i]), float(y0[i] + side[i]))
        img = Image.fromarray(images[i]).resize((out_size, out_size), Image.Resampling.BICUBIC, box=box)
        x = np.asarray(img, dtype=np.float32)
        if flip and flips[i]:
            x = x[:, ::-1]
        if jitter > 0:
            brightness, contrast, saturation = factors[i]
            x = x * brightness
            x = (x - x.mean()) * contrast + x.mean()
            gray = (x @ gray_weights)[..., None]
            x = gray + (x - gray) * saturation
        out[i] = _to_uint8(x)
    return out


# ---------------------------------------------------------------------------------------------------
# Image bank: Parquet shards of uint8 images + bank.json
# ---------------------------------------------------------------------------------------------------

BANK_FILE = "bank.json"
BANK_FORMAT = "farm-image-bank"
BANK_VERSION = 1
#: Rows per Parquet row group: the unit of random access in ``ImageBank.read``.
ROW_GROUP_SIZE = 1000
#: Image kinds a bank can hold. "synthetic" mixes gratings, dots, pink and white noise.
BANK_KINDS = ("natural", "gaudy", "synthetic", "natural_like", "gratings", "dots", "pink_noise",
              "white_noise")
_SYNTHETIC_PARTS = ("gratings", "dots", "pink_noise", "white_noise")


@dataclass
class BankConfig:
    """What an image bank holds.

    n_images: total images. image_size: side S in pixels (paper: 112).
    proportions: kind -> fraction (sums to 1). "natural" = augmented source images (crops, flips,
        colour jitter), "gaudy" = the gaudy transform of an augmented source image (of a natural_like
        image when there are no sources), "synthetic" = gratings / dots / pink / white noise in equal
        shares; the parts ("gratings", ...) and "natural_like" may also be named directly.
    seed: everything is drawn from it. shard_size: images per Parquet shard (memory is O(shard_size)).
    crop_scale, jitter: ``augment`` settings for natural images. gaudy_sigma: ``gaudy`` pre-smoothing.
    """

    n_images: int
    image_size: int = 112
    proportions: dict = field(default_factory=lambda: {"natural": 0.6, "gaudy": 0.2, "synthetic": 0.2})
    seed: int = 0
    shard_size: int = 10000
    crop_scale: tuple = (0.7, 1.0)
    jitter: float = 0.1
    gaudy_sigma: float = 0.0

    def __post_init__(self):
        self.n_images, self.image_size, self.shard_size = int(self.n_images), int(self.image_size), int(self.shard_size)
        self.crop_scale = tuple(float(c) for c in self.crop_scale)
        self.proportions = {str(k): float(v) for k, v in self.proportions.items()}
        if self.n_images < 1:
            raise ValueError(f"BankConfig.n_images must be >= 1, got {self.n_images}")
        if self.image_size < 4:
            raise ValueError(f"BankConfig.image_size must be >= 4, got {self.image_size}")
        if int(self.seed) < 0:
            raise ValueError(f"BankConfig.seed must be >= 0, got {self.seed}")
        if self.shard_size < 1:
            raise ValueError(f"BankConfig.shard_size must be >= 1, got {self.shard_size}")
        unknown = set(self.proportions) - set(BANK_KINDS)
        if unknown:
            raise ValueError(f"BankConfig.proportions: unknown kinds {sorted(unknown)}; known: {BANK_KINDS}")
        if any(v < 0 for v in self.proportions.values()) or abs(sum(self.proportions.values()) - 1) > 1e-6:
            raise ValueError(f"BankConfig.proportions must be >= 0 and sum to 1, got {self.proportions}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        d["proportions"] = dict(sorted(self.proportions.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BankConfig":
        return from_dict(cls, d)

    def kind_counts(self) -> dict[str, int]:
        """Exact image count per kind (largest remainder), in sorted kind order."""
        kinds = sorted(k for k, p in self.proportions.items() if p > 0)
        return dict(zip(kinds, _apportion([self.proportions[k] * self.n_images for k in kinds], self.n_images)))

    def shard_kind_counts(self) -> list[dict[str, int]]:
        """Per shard, the image count per kind: each shard's running totals stay within one image of
        the exact proportion, and the totals over shards equal ``kind_counts()``."""
        totals = self.kind_counts()
        kinds = list(totals)
        assigned = np.zeros(len(kinds), dtype=np.int64)
        out = []
        for first in range(0, self.n_images, self.shard_size):
            end = min(first + self.shard_size, self.n_images)
            target = np.array([totals[k] * end / self.n_images for k in kinds])
            counts = np.maximum(np.floor(target + 1e-9).astype(np.int64) - assigned, 0)
            short = (end - first) - int(counts.sum())
            if short > 0:
                deficit = target - (assigned + counts)
                for j in np.argsort(-deficit, kind="stable")[:short]:
                    counts[j] += 1
            assigned += counts
            out.append(dict(zip(kinds, (int(c) for c in counts))))
        return out


def _apportion(quotas: Sequence[float], total: int) -> list[int]:
    """Integers summing to ``total`` that are within one of each quota (largest remainder)."""
    floors = [int(np.floor(q + 1e-9)) for q in quotas]
    rest = total - sum(floors)
    order = np.argsort([-(q - f) for q, f in zip(quotas, floors)], kind="stable")
    for j in order[:rest]:
        floors[j] += 1
    return floors


class _Sources:
    """Natural source images: a list of uint8 (n_i, H_i, W_i, 3) arrays indexed as one sequence."""

    def __init__(self, source_images):
        if source_images is None:
            arrays = []
        elif isinstance(source_images, np.ndarray):
            arrays = [source_images]
        else:
            arrays = list(source_images)
        self.arrays = [_check_images(a, f"source_images[{i}]") for i, a in enumerate(arrays)]
        # sessions without published images have (N, 0, 0, 3) arrays: nothing to crop from
        self.arrays = [a for a in self.arrays if a.size]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.arrays[j][i - self.offsets[j]]

    def digest(self) -> str:
        """sha256 of the image sequence: the same images give the same digest however they are
        split into arrays (each run of equal-sized images is closed by its size and count)."""
        h = hashlib.sha256()
        run_shape, run_count = None, 0
        for a in self.arrays:
            if a.shape[1:] != run_shape and run_count:
                h.update(repr((run_shape, run_count)).encode())
                run_count = 0
            run_shape = a.shape[1:]
            run_count += len(a)
            h.update(np.ascontiguousarray(a).data)
        h.update(repr((run_shape, run_count)).encode())
        return h.hexdigest()


def _generate(kind: str, count: int, config: BankConfig, sources: _Sources,
              rng: np.random.Generator) -> np.ndarray:
    """``count`` images of one bank kind, uint8 (count, S, S, 3)."""
    s = config.image_size
    if count == 0:
        return np.empty((0, s, s, 3), dtype=np.uint8)
    if kind in ("natural", "gaudy") and len(sources):
        picks = rng.integers(0, len(sources), count)
        imgs = np.empty((count, s, s, 3), dtype=np.uint8)
        for j, p in enumerate(picks):
            imgs[j] = augment(sources[int(p)][None], rng, config.crop_scale, True, config.jitter, s)[0]
        return gaudy(imgs, config.gaudy_sigma) if kind == "gaudy" else imgs
    if kind == "natural":
        raise ValueError("build_bank(): the 'natural' kind needs source_images (none were given)")
    if kind == "gaudy":
        return gaudy(natural_like(s, count, rng), config.gaudy_sigma)
    if kind == "synthetic":
        parts = rng.integers(0, len(_SYNTHETIC_PARTS), count)
        out = np.empty((count, s, s, 3), dtype=np.uint8)
        for j, part in enumerate(_SYNTHETIC_PARTS):
            where = np.flatnonzero(parts == j)
            out[where] = _generate(part, len(where), config, sources, rng)
        return out
    return {"natural_like": natural_like, "gratings": gratings, "dots": random_dots,
            "pink_noise": pink_noise, "white_noise": white_noise}[kind](s, count, rng)


def _shard_table(first_id: int, kinds: np.ndarray, images: np.ndarray):
    import pyarrow as pa

    n, s = len(images), images.shape[1]
    width = s * s * 3
    pixels = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(images))])
    return pa.table({
        "image_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "kind": pa.array(kinds.astype(str).tolist(), type=pa.string()),
        "pixels": pixels,
    })


def _pixels_to_numpy(column, image_size: int) -> np.ndarray:
    """A Parquet fixed-size-binary pixel column -> uint8 (n, S, S, 3)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = image_size * image_size * 3
    if arr.type != pa.binary(width):
        raise ValueError(f"pixels column has type {arr.type}, expected fixed_size_binary[{width}]")
    if arr.null_count:
        raise ValueError("pixels column has missing images")
    buf = arr.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return flat.reshape(len(arr), image_size, image_size, 3)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _shard_matches(path: Path, bank_id: str, index: int, n: int) -> bool:
    """True when ``path`` is a complete shard ``index`` of bank ``bank_id`` (for resuming)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        kv = meta.metadata or {}
        return (kv.get(b"farm.bank_id") == bank_id.encode() and kv.get(b"farm.shard") == str(index).encode()
                and meta.num_rows == n)
    except Exception:  # unreadable or truncated: regenerate it
        return False


def source_digest(source_images) -> str:
    """The digest ``build_bank`` records as the bank's ``source_hash`` for these source images (None:
    no sources): a cached bank can be checked against the sources a job would build it from."""
    return _Sources(source_images).digest()


def build_bank(source_images, config: BankConfig, out_dir: str | Path,
               progress: Callable[[int, int], None] | None = None) -> "ImageBank":
    """Generate an image bank into ``out_dir`` and return it opened.

    source_images: uint8 (M, H, W, 3), or an iterable of such arrays (sizes may differ, e.g. one per
        session), or None when no kind needs them. Sources of any size are cropped and resized to S.
    Writes ``shard-00000.parquet``, ... (columns image_id int64, kind string, pixels
    fixed_size_binary[S*S*3] = the uint8 (S, S, 3) image in C order), then ``bank.json``. Shard k
    holds image ids [k*shard_size, ...) and is drawn from its own rng (seed, k), so memory stays
    O(shard_size) and the same config and sources give byte-identical files. Every write is atomic;
    a rerun after an interruption keeps the finished shards of the same bank. An existing complete
    bank with the same bank_id is returned as is; a different bank in ``out_dir`` is an error.
    progress(images_done, n_images) is called after each shard.
    """
    import pyarrow.parquet as pq

    if not isinstance(config, BankConfig):
        raise TypeError(f"build_bank(): config must be a BankConfig, got {type(config).__name__}")
    sources = _Sources(source_images)
    needs_sources = config.proportions.get("natural", 0) > 0
    if needs_sources and not len(sources):
        raise ValueError("build_bank(): proportions ask for 'natural' images but source_images is empty")
    source_hash = sources.digest()
    bank_id = hashlib.sha256(json.dumps({"config": config.to_dict(), "sources": source_hash},
                                        sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / BANK_FILE
    if manifest_path.exists():
        existing = ImageBank(out)
        if existing.bank_id == bank_id:
            return existing
        raise FileExistsError(f"{out}: holds bank {existing.bank_id}, not {bank_id}; use another folder")

    shards = []
    done = 0
    for index, counts in enumerate(config.shard_kind_counts()):
        first = index * config.shard_size
        n = sum(counts.values())
        name = f"shard-{index:05d}.parquet"
        path = out / name
        if not _shard_matches(path, bank_id, index, n):
            rng = np.random.default_rng([config.seed, index])
            kinds = np.concatenate([np.full(c, k, dtype=object) for k, c in counts.items()])
            kinds = kinds[rng.permutation(n)]
            images = np.empty((n, config.image_size, config.image_size, 3), dtype=np.uint8)
            for k in counts:
                where = np.flatnonzero(kinds == k)
                images[where] = _generate(k, len(where), config, sources, rng)
            table = _shard_table(first, kinds, images)
            table = table.replace_schema_metadata({
                "farm.bank_id": bank_id, "farm.shard": str(index), "farm.image_size": str(config.image_size)})
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
            log.info("image bank %s: wrote %s (%d images)", bank_id, name, n)
        shards.append({"file": name, "first_id": first, "n_images": n, "kinds": counts,
                       "sha256": _sha256_file(path)})
        done += n
        if progress is not None:
            progress(done, config.n_images)

    manifest = {"format": BANK_FORMAT, "version": BANK_VERSION, "bank_id": bank_id,
                "config": config.to_dict(), "source_hash": source_hash, "n_sources": len(sources),
                "n_images": config.n_images, "image_size": config.image_size,
                "row_group_size": ROW_GROUP_SIZE, "kind_counts": config.kind_counts(), "shards": shards}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
    return ImageBank(out)


class ImageBank:
    """An image bank written by ``build_bank``, opened read-only.

    ``len(bank)`` images of ``bank.image_size`` px; ids 0..len-1. Images come back as uint8
    (n, S, S, 3). Only the shards (or row groups) asked for are read.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / BANK_FILE
        manifest = read_manifest(path, ("format", BANK_FORMAT), ("version", BANK_VERSION), "farm image bank",
                                 "build one with build_bank")
        try:
            self.config = BankConfig.from_dict(manifest["config"])
            self.shards = [dict(s) for s in manifest["shards"]]
            self._n = int(manifest["n_images"])
            self._bank_id = str(manifest["bank_id"])
            self._image_size = int(manifest["image_size"])
            self._row_group_size = int(manifest["row_group_size"])
            firsts = [int(s["first_id"]) for s in self.shards]
            sizes = [int(s["n_images"]) for s in self.shards]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt bank manifest: {e!r}") from e
        if sum(sizes) != self._n or firsts != list(np.cumsum([0] + sizes[:-1])):
            raise ValueError(f"{path}: shards do not cover image ids 0..{self._n - 1} contiguously")
        self._firsts = np.asarray(firsts, dtype=np.int64)
        self.manifest = manifest

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ImageBank({str(self.directory)!r}, n_images={self._n}, image_size={self._image_size})"

    @property
    def bank_id(self) -> str:
        return self._bank_id

    @property
    def image_size(self) -> int:
        return self._image_size

    def _shard_path(self, i: int) -> Path:
        p = self.directory / self.shards[i]["file"]
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image bank shard missing")
        return p

    def _read_table(self, i: int, row_groups=None, columns=None):
        import pyarrow.parquet as pq

        path = self._shard_path(i)
        f = pq.ParquetFile(path)
        t = f.read(columns=columns) if row_groups is None else f.read_row_groups(row_groups, columns=columns)
        return t

    def read_shard(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard ``i``: (image_ids int64 (n,), images uint8 (n, S, S, 3), kinds str (n,))."""
        if not 0 <= int(i) < len(self.shards):
            raise IndexError(f"{self.directory}: shard {i} out of range (the bank has {len(self.shards)})")
        t = self._read_table(int(i))
        if t.num_rows != self.shards[i]["n_images"]:
            raise ValueError(f"{self._shard_path(i)}: {t.num_rows} rows, bank.json says "
                             f"{self.shards[i]['n_images']}")
        ids = t.column("image_id").to_numpy()
        kinds = np.asarray(t.column("kind").to_pylist(), dtype=object)
        return ids, _pixels_to_numpy(t.column("pixels"), self._image_size), kinds

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield one shard at a time: (image_ids int64 (n,), images uint8 (n, S, S, 3), kinds str (n,))."""
        for i in range(len(self.shards)):
            yield self.read_shard(i)

    def read(self, ids) -> np.ndarray:
        """Images for the given ids, in that order: uint8 (len(ids), S, S, 3). Reads only the row
        groups that hold them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self._n):
            raise IndexError(f"ImageBank.read(): ids must be in 0..{self._n - 1}, got "
                             f"{ids.min()}..{ids.max()}")
        s = self._image_size
        out = np.empty((len(ids), s, s, 3), dtype=np.uint8)
        shard_of = np.searchsorted(self._firsts, ids, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == i)
            rows = ids[sel] - self._firsts[i]
            groups = np.unique(rows // self._row_group_size)
            t = self._read_table(int(i), row_groups=[int(g) for g in groups], columns=["image_id", "pixels"])
            got_ids = t.column("image_id").to_numpy()
            imgs = _pixels_to_numpy(t.column("pixels"), s)
            pos = np.searchsorted(got_ids, ids[sel])
            if np.any(got_ids[np.minimum(pos, len(got_ids) - 1)] != ids[sel]):
                raise ValueError(f"{self._shard_path(int(i))}: image ids do not match bank.json")
            out[sel] = imgs[pos]
        return out

    def kinds(self) -> np.ndarray:
        """The kind of every image, str (n,) in id order (reads only the kind columns)."""
        return np.concatenate([np.asarray(self._read_table(i, columns=["kind"]).column("kind").to_pylist(),
                                          dtype=object) for i in range(len(self.shards))])

    def load_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every image at once, as ``iter_shards`` would yield one shard: (ids, images, kinds).
        Memory is the whole bank: use ``iter_shards`` for big banks."""
        parts = list(self.iter_shards())
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def verify(self) -> None:
        """Check every shard's sha256 against bank.json; raise ValueError naming the first mismatch."""
        for i, shard in enumerate(self.shards):
            path = self._shard_path(i)
            if _sha256_file(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 differs from bank.json (file changed or corrupt)")
