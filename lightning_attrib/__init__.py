"""lightning-attrib: training-data attribution inside PyTorch Lightning runs."""
__version__ = "0.1.0"

from .core.results import AttributionResult, load_results  # noqa: E402

__all__ = ["AttributionResult", "__version__", "load_results"]
