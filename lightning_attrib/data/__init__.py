"""Bundled data sets (offline), seeded label noise with a recorded truth mask, and subset masks."""
from .digits import DigitsDataModule, load_digits_tensors
from .noise import NoisyLabels, flip_labels

__all__ = ["DigitsDataModule", "NoisyLabels", "flip_labels", "load_digits_tensors"]
