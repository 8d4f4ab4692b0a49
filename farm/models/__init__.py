"""Models: the compact model, the deep-ensemble teacher and loaders for the published models."""

from farm.models.base import Teacher
from farm.models.compact import CompactModel, CompactSpec, build_compact, load_compact, narrow, save_compact

__all__ = ["Teacher", "CompactModel", "CompactSpec", "build_compact", "load_compact", "narrow", "save_compact"]
