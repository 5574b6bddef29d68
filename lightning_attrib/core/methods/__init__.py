"""Attribution methods behind one interface (`FeatureMethod`)."""
from .base import FeatureMethod, SnapshotInfo, TrainStatistics
from .trak import TRAK, IllConditionedKernelWarning
from .registry import METHODS, make_method

__all__ = ["METHODS", "make_method", "FeatureMethod", "SnapshotInfo", "TrainStatistics", "TRAK", "IllConditionedKernelWarning"]
