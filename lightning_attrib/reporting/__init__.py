"""Where results land: W&B (scalars, tables with images, histograms, artifacts), else any Lightning logger's scalars."""
from .reporters import LoggerReporter, WandbReporter, make_reporter

__all__ = ["LoggerReporter", "WandbReporter", "make_reporter"]
