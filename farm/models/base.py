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

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray: ...


class CompactTeacher:
    """Compact models (one per neuron, or one shared model with many outputs) serving as a Teacher.

    models: CompactModels whose outputs are concatenated in order; ``neuron_ids`` defaults to the
    models' ``spec.neuron_ids``. Runs in eval mode (BN uses its running statistics).
    """

    def __init__(self, models, neuron_ids: Sequence[str] | None = None, device="cpu"):
        import torch  # local: keep importing farm.models.base cheap for type users

        self.models = [m.to(device).eval() for m in models]
        self.device = torch.device(device)
        if neuron_ids is None:
            neuron_ids = [nid for m in self.models for nid in m.spec.neuron_ids]
        n_out = sum(m.spec.n_outputs for m in self.models)
        if len(neuron_ids) != n_out:
            raise ValueError(f"CompactTeacher: {len(neuron_ids)} neuron ids for {n_out} model outputs")
        self.neuron_ids = tuple(neuron_ids)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        # Small batches: a 112 px layer-0 activation is ~600 MB at batch 256, and fresh pages that
        # large cost as much to zero as the convolution itself (measured on 2 CPU cores).
        import torch

        from farm.models.input import check_size, recenter

        for m in self.models:  # a clear error, not a shape mismatch deep in the readout
            check_size(m, images, "CompactTeacher.predict: the images")
        out = np.empty((len(images), len(self.neuron_ids)), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                x = recenter(images[s:s + batch_size], self.device)
                cols = [m(x) for m in self.models]
                out[s:s + batch_size] = torch.cat(cols, dim=1).float().cpu().numpy()
        return out
