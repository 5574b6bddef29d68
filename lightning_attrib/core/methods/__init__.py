"""Attribution methods behind one interface (`FeatureMethod`)."""
from .base import FeatureMethod, SnapshotInfo, TrainStatistics
from .trak import TRAK, IllConditionedKernelWarning

__all__ = ["FeatureMethod", "SnapshotInfo", "TrainStatistics", "TRAK", "IllConditionedKernelWarning"]
