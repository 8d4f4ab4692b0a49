"""Recording sessions: images + responses + ids, stored as Parquet.

A Session holds one recording session:
  images     uint8 (N, H, W, 3) RGB
  responses  float32 (neurons, N, repeats), spikes per 100 ms, NaN-padded at the END of the repeat
             axis where an image had fewer repeats; averaged-only data has repeats == 1
  image_kinds  (N,) str: "normal", "gaudy", "synthetic", "maximizing", ...
  neuron_ids   "<session>:<index>", index = row in responses
  role         "train" | "validation" | "test" | "heldout"
  has_repeats  True when the repeat axis holds raw repeats; False when it is repeat-averaged only
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROLES = ("train", "validation", "test", "heldout")


@dataclass
class Session:
    session_id: str
    images: np.ndarray
    responses: np.ndarray
    image_kinds: np.ndarray
    role: str = "train"
    has_repeats: bool = True
    animal: str | None = None
    neuron_ids: tuple[str, ...] = field(default_factory=tuple)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.session_id = str(self.session_id)
        if not self.neuron_ids:
            self.neuron_ids = tuple(f"{self.session_id}:{i}" for i in range(np.shape(self.responses)[0]))
        self.neuron_ids = tuple(self.neuron_ids)
        self.image_kinds = np.asarray(self.image_kinds, dtype=object)

    @property
    def n_neurons(self) -> int:
        return int(self.responses.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.responses.shape[1])

    def mean_responses(self) -> np.ndarray:
        """Repeat-averaged responses, float32 (neurons, images)."""
        return np.nanmean(self.responses, axis=2).astype(np.float32)

    def repeat_counts(self) -> np.ndarray:
        """Non-NaN repeats per image, int (images,) (from neuron 0; the pattern is shared)."""
        return np.sum(~np.isnan(self.responses[0]), axis=1)

    def subset(self, image_index) -> "Session":
        """A Session with only the given images (same neurons), e.g. the first half of a test session."""
        idx = np.asarray(image_index)
        return Session(
            session_id=self.session_id,
            images=self.images[idx],
            responses=self.responses[:, idx],
            image_kinds=self.image_kinds[idx],
            role=self.role,
            has_repeats=self.has_repeats,
            animal=self.animal,
            neuron_ids=self.neuron_ids,
            metadata=dict(self.metadata),
        )

    def halves(self) -> tuple["Session", "Session"]:
        """First half (readout fitting) and second half (evaluation) in file order (method.md §1.6)."""
        h = self.n_images // 2
        return self.subset(np.arange(h)), self.subset(np.arange(h, self.n_images))
