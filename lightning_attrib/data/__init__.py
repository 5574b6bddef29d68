"""Bundled data sets (offline), seeded label noise with a recorded truth mask, and subset masks."""
from .digits import DigitsDataModule, load_digits_tensors
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .noise import NoisyLabels, flip_labels
from .spurious import DIGITS_CORNER_PATCH, stamp_patch

__all__ = ["DIGITS_CORNER_PATCH", "FASHION_MNIST_CLASSES", "DigitsDataModule", "NoisyLabels", "flip_labels",
           "load_digits_tensors", "load_fashion_mnist", "stamp_patch"]
