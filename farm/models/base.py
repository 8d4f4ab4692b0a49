"""The one interface every teacher offers to the rest of farm."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Teacher(Protocol):
    """Anything that predicts every neuron's response to any image.

    ``predict(images)``: images uint8 (N, H, W, 3) RGB -> float32 (N, n_neurons), batched,
    deterministic (eval mode). ``neuron_ids``: the id ``"<session>:<index>"`` of each output column.
    """

    neuron_ids: Sequence[str]

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray: ...
