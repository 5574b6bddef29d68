"""Plain-torch attribution engine (no Lightning import): outputs, gradients, projection, store, methods, pipeline."""
from .dist import Dist, LocalDist, TorchDist
from .factorized import FactorizedProjector
from .sketch import KroneckerProjector, TensorSketchProjector, make_projector
from .gradients import PerExampleGradients, select_parameters
from .methods import TRAK, FeatureMethod
from .outputs import ClassificationMargin, CrossEntropyLoss, OutputFunction, resolve_output
from .pipeline import Attributor, Snapshot, weights_fingerprint
from .projection import RandomProjector
from .results import AttributionResult, load_results
from .store import FeatureStore, StoreMismatchError
from .tasks import CustomOutput, Task, TaskConfigError, TaskOutput

__all__ = [
    "Attributor", "AttributionResult", "ClassificationMargin", "CrossEntropyLoss", "CustomOutput", "Dist",
    "FeatureMethod", "Task", "TaskConfigError", "TaskOutput",
    "FactorizedProjector", "KroneckerProjector", "TensorSketchProjector", "make_projector", "FeatureStore",
    "LocalDist", "OutputFunction", "PerExampleGradients", "RandomProjector",
    "Snapshot",
    "StoreMismatchError", "TRAK", "TorchDist", "load_results", "resolve_output", "select_parameters",
    "weights_fingerprint",
]
