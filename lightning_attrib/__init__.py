"""lightning-attrib: training-data attribution inside PyTorch Lightning runs."""
__version__ = "0.1.0"

from .core.results import AttributionResult, load_results  # noqa: E402
from .callbacks import AttributionCallback, CheckpointCapture  # noqa: E402
from .attribute import attribute, snapshots_from  # noqa: E402

__all__ = ["AttributionCallback", "AttributionResult", "CheckpointCapture", "__version__", "attribute",
           "load_results", "snapshots_from"]
