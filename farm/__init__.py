"""farm: a compression farm for compact neural-response models of visual cortex.

The core (``farm.data``, ``farm.models``, ``farm.metrics``, ``farm.distill``, ``farm.prune``,
``farm.compress``, ``farm.specialize``, ``farm.analysis``) is plain PyTorch/NumPy; Ray
(``farm.fanout``, ``farm.sweep``, ``farm.analyze_job``, ``farm.submit``) and MLflow (``farm.tracking``)
live at the edges, and ``farm.pipeline`` wires the stages together through them.
"""

__version__ = "0.1.0"
