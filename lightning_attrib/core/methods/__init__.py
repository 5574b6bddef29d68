"""Attribution methods behind one interface (`FeatureMethod`)."""
from .base import FeatureMethod, SnapshotInfo, TrainStatistics
from .context import ModelContext
from .gradsim import GradientCosine, GradientDot
from .influence import ConvergenceWarning, InfluenceFunction
from .tracin import TracIn
from .trak import TRAK, IllConditionedKernelWarning
from .registry import METHODS, make_method

__all__ = ["METHODS", "make_method", "FeatureMethod", "SnapshotInfo", "TrainStatistics", "TRAK", "IllConditionedKernelWarning",
           "ConvergenceWarning", "GradientCosine", "GradientDot", "InfluenceFunction", "ModelContext", "TracIn"]
