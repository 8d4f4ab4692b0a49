"""Write/read time of one session Parquet file (farm.data.sessions).

The case of the task card: 1,200 images of 112x112 RGB, 50 neurons x 14 repeats, NaN padding on
the repeat axis. Pixels are either smooth (JPEG-like natural images compress about as real ones do)
or, with ``--images V4_ZIP``, the first 1,200 images of a real V4 image zip.

    python benchmarks/sessions_io.py [--repeats 5] [--images /path/images_190923.zip]

Prints the machine, date and library versions, then write and read times (best and median).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from farm.data.sessions import Session, read_session, write_session  # noqa: E402

N_IMAGES, SIZE, N_NEURONS, N_REPEATS = 1200, 112, 50, 14


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """uint8 (n, 112, 112, 3): upsampled 14x14 noise plus mild pixel noise, roughly photo-like."""
    coarse = rng.uniform(0, 255, size=(n, 14, 14, 3))
    fine = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    return np.clip(fine + rng.normal(0, 6, size=fine.shape), 0, 255).astype(np.uint8)


def zip_images(path: Path, n: int) -> np.ndarray:
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        names = sorted(m for m in zf.namelist() if m.endswith(".jpg"))[:n]
        return np.stack([np.asarray(Image.open(BytesIO(zf.read(m))).convert("RGB")) for m in names])


def make_session(images: np.ndarray, rng: np.random.Generator) -> Session:
    n = images.shape[0]
    counts = rng.integers(8, N_REPEATS + 1, size=n)
    responses = rng.poisson(4.0, size=(N_NEURONS, n, N_REPEATS)).astype(np.float32)
    responses[:, np.arange(N_REPEATS)[None, :] >= counts[:, None]] = np.nan
    return Session("bench", images, responses, np.array(["normal"] * n, dtype=object))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=Path, default=None, help="a V4 image zip to take real pixels from")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    images = zip_images(args.images, N_IMAGES) if args.images else smooth_images(rng, N_IMAGES)
    session = make_session(images, rng)

    print(f"date     {dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine  {platform.node()} {platform.machine()} {platform.processor() or ''} "
          f"cpus={os.cpu_count()} python={platform.python_version()} "
          f"numpy={np.__version__} pyarrow={pa.__version__}")
    print(f"session  {session.n_images} images {images.shape[1]}x{images.shape[2]}x3, "
          f"{session.n_neurons} neurons x {session.responses.shape[2]} repeats "
          f"(pixels: {args.images or 'synthetic smooth'})")
    print(f"raw      {(images.nbytes + session.responses.nbytes) / 1e6:.1f} MB in memory")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        writes, reads = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            write_session(session, path)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = read_session(path)
            reads.append(time.perf_counter() - t0)
        assert np.array_equal(back.images, session.images)
        assert np.array_equal(back.responses, session.responses, equal_nan=True)
        print(f"file     {path.stat().st_size / 1e6:.1f} MB")
    print(f"write    best {min(writes):.3f} s  median {statistics.median(writes):.3f} s  (n={args.repeats})")
    print(f"read     best {min(reads):.3f} s  median {statistics.median(reads):.3f} s  (n={args.repeats}, "
          "includes validation; file in page cache)")


if __name__ == "__main__":
    main()
