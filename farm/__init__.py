"""farm: a compression farm for compact neural-response models of visual cortex.

The core (``farm.data``, ``farm.models``, ``farm.metrics``, ``farm.distill``, ``farm.prune``,
``farm.compress``) is plain PyTorch/NumPy; Ray (``farm.fanout``, ``farm.sweep``) and MLflow
(``farm.tracking``) live at the edges.
"""

__version__ = "0.1.0"
