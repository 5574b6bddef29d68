"""Bundled data sets (offline), seeded label noise with a recorded truth mask, and subset masks."""
from .digits import DigitsDataModule, load_digits_tensors
from .noise import NoisyLabels, flip_labels
from .spurious import DIGITS_CORNER_PATCH, stamp_patch

__all__ = ["DIGITS_CORNER_PATCH", "DigitsDataModule", "NoisyLabels", "flip_labels", "load_digits_tensors", "stamp_patch"]
