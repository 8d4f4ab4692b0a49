"""Dot stimuli and tuning curves: location, size and number (method.md §7.2, Ext. Data Fig. 6).

Stimuli are filled discs (``farm.data.images.dots``: a pixel belongs to a dot when its centre is within
the radius) of one colour on a uniform background. The paper's colours, sizes and counts are unknown;
our defaults: white dots on the distillation images' mean grey (zero recentered input).

- location: a dot of radius 5 px (paper) centred on a grid with ``location_stride`` px spacing, centres
  at the middle of each stride x stride block (a 28 x 28 grid at 112 px with stride 4, the paper's
  recording grid). The preferred location is the grid point of largest response.
- size: one dot at the preferred location, radius over ``radii``; the preferred radius is the argmax.
- number: ``n_per_count`` images (paper: 10) per count; dot centres uniform in a disc of radius
  ``number_spread`` around the preferred location, kept ``number_gap`` px apart when possible; radius
  ``number_radius`` (None: the preferred radius).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from farm.analysis.common import check_output, predict
from farm.data.images import MEAN_GREY, dots as render_dots
from farm.models.compact import CompactModel

DEFAULT_RADII = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 17.0, 20.0, 24.0, 28.0)
DEFAULT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class DotParams:
    """color, background: RGB 0-255. radii: dot radii for size tuning (px). location_radius: dot radius
    of the location map (paper: 5 px). location_stride: grid spacing (px). counts: dot numbers.
    n_per_count: random images per count (paper: 10). number_radius: dot radius of number stimuli
    (None: the preferred radius). number_spread: radius (px) of the disc around the preferred location
    that holds the dot centres. number_gap: minimum gap between dot edges (px) when placement allows.
    seed: random placements. batch_size: images per forward pass."""

    color: tuple[int, int, int] = (255, 255, 255)
    background: tuple[int, int, int] = MEAN_GREY
    radii: tuple[float, ...] = DEFAULT_RADII
    location_radius: float = 5.0
    location_stride: int = 4
    counts: tuple[int, ...] = DEFAULT_COUNTS
    n_per_count: int = 10
    number_radius: float | None = None
    number_spread: float = 16.0
    number_gap: float = 1.0
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        for name in ("color", "background"):
            v = tuple(int(c) for c in np.broadcast_to(np.asarray(getattr(self, name)), (3,)))
            if min(v) < 0 or max(v) > 255:
                raise ValueError(f"DotParams.{name} must be RGB in 0..255, got {getattr(self, name)}")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        if not self.radii or min(self.radii) <= 0:
            raise ValueError(f"DotParams.radii must be positive radii in pixels, got {self.radii}")
        if not self.counts or min(self.counts) < 1 or self.n_per_count < 1:
            raise ValueError(f"DotParams: counts must be >= 1 and n_per_count >= 1, got {self.counts}, "
                             f"{self.n_per_count}")
        if self.location_stride < 1 or not self.location_radius > 0:
            raise ValueError("DotParams: location_stride must be >= 1 and location_radius > 0")


@dataclass
class DotTuningResult:
    """location_y, location_x: float (G,) grid centres (px); location_map: float64 (Gy, Gx) responses.
    preferred_location: float (2,) (y, x) px. radii: float (S,); size_responses: float64 (S,);
    preferred_radius: px. counts: int (C,); number_responses: float64 (C, n_per_count);
    number_curve: float64 (C,) mean over images; number_radius: px used for number stimuli."""

    location_y: np.ndarray
    location_x: np.ndarray
    location_map: np.ndarray
    preferred_location: np.ndarray
    radii: np.ndarray
    size_responses: np.ndarray
    preferred_radius: float
    counts: np.ndarray
    number_responses: np.ndarray
    number_curve: np.ndarray
    number_radius: float
    output: int
    params: DotParams = field(default_factory=DotParams)

    def summary(self) -> dict[str, float]:
        return {"dots_preferred_radius": float(self.preferred_radius),
                "dots_preferred_y": float(self.preferred_location[0]),
                "dots_preferred_x": float(self.preferred_location[1]),
                "dots_size_max_response": float(self.size_responses.max()),
                "dots_size_range": float(np.ptp(self.size_responses)),
                "dots_number_range": float(np.ptp(self.number_curve))}


def location_grid(image_size: int, stride: int) -> np.ndarray:
    """Grid centres (px): the middle of each stride x stride block, (stride - 1) / 2 + stride * i."""
    return (stride - 1) / 2 + stride * np.arange(image_size // stride)


def location_stimuli(image_size: int, params: DotParams) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (G*G, H, W, 3) one dot per grid point (row-major), and the grid (G,)."""
    g = location_grid(image_size, params.location_stride)
    centers = [(y, x) for y in g for x in g]
    return render_dots(image_size, centers, params.location_radius, params.color, params.background), g


def size_stimuli(image_size: int, center, radii, params: DotParams) -> np.ndarray:
    """uint8 (len(radii), H, W, 3): one dot of each radius at ``center`` (y, x) px."""
    c = tuple(float(v) for v in center)
    return render_dots(image_size, [c] * len(radii), list(map(float, radii)), params.color, params.background)


def _placements(center, count: int, radius: float, spread: float, gap: float, size: int,
                rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """``count`` centres uniform in a disc around ``center``, inside the image, kept apart if possible."""
    cy, cx = center
    lo, hi = 0.0, size - 1.0
    out: list[np.ndarray] = []
    min_d = 2 * radius + gap
    for _ in range(count):
        best = None
        for _t in range(tries):
            rr = spread * np.sqrt(rng.uniform())
            th = rng.uniform(0, 2 * np.pi)
            p = np.clip(np.array([cy + rr * np.sin(th), cx + rr * np.cos(th)]), lo, hi)
            if best is None:
                best = p
            if all(np.hypot(*(p - q)) >= min_d for q in out):
                best = p
                break
        out.append(best)
    return np.asarray(out)


def number_stimuli(image_size: int, center, radius: float, params: DotParams) -> np.ndarray:
    """uint8 (len(counts) * n_per_count, H, W, 3): random placements, count-major order."""
    rng = np.random.default_rng(params.seed)
    centers = [_placements(center, c, radius, params.number_spread, params.number_gap, image_size, rng)
               for c in params.counts for _ in range(params.n_per_count)]
    return render_dots(image_size, centers, float(radius), params.color, params.background)


def location_tuning(model: CompactModel, params: DotParams | None = None, output: int = 0, device=None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(grid (G,), responses (G, G)) to a dot of ``location_radius`` at every grid point."""
    params = params or DotParams()
    stim, g = location_stimuli(model.spec.image_size, params)
    r = predict(model, stim, output=output, batch_size=params.batch_size, device=device, dtype=np.float64)
    return g, r.reshape(len(g), len(g))


def size_tuning(model: CompactModel, center, params: DotParams | None = None, output: int = 0,
                device=None) -> np.ndarray:
    """Responses (len(radii),) to one dot of each radius at ``center`` (y, x) px."""
    params = params or DotParams()
    stim = size_stimuli(model.spec.image_size, center, params.radii, params)
    return predict(model, stim, output=output, batch_size=params.batch_size, device=device, dtype=np.float64)


def number_tuning(model: CompactModel, center, radius: float, params: DotParams | None = None, output: int = 0,
                  device=None) -> np.ndarray:
    """Responses (len(counts), n_per_count) to random dot placements near ``center``."""
    params = params or DotParams()
    stim = number_stimuli(model.spec.image_size, center, radius, params)
    r = predict(model, stim, output=output, batch_size=params.batch_size, device=device, dtype=np.float64)
    return r.reshape(len(params.counts), params.n_per_count)


def dot_tuning(model: CompactModel, params: DotParams | None = None, output: int = 0, center=None,
               device=None) -> DotTuningResult:
    """Location map, then size and number tuning at the preferred location (or at ``center`` (y, x))."""
    params = params or DotParams()
    output = check_output(model, output)
    g, loc = location_tuning(model, params, output, device)
    iy, ix = np.unravel_index(int(np.argmax(loc)), loc.shape)
    preferred = np.array([g[iy], g[ix]]) if center is None else np.asarray(center, np.float64).reshape(2)
    sizes = size_tuning(model, preferred, params, output, device)
    preferred_radius = float(params.radii[int(np.argmax(sizes))])
    n_radius = preferred_radius if params.number_radius is None else float(params.number_radius)
    numbers = number_tuning(model, preferred, n_radius, params, output, device)
    return DotTuningResult(location_y=g, location_x=g.copy(), location_map=loc, preferred_location=preferred,
                           radii=np.asarray(params.radii), size_responses=sizes, preferred_radius=preferred_radius,
                           counts=np.asarray(params.counts), number_responses=numbers,
                           number_curve=numbers.mean(1), number_radius=n_radius, output=output, params=params)
