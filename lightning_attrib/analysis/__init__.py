"""Analyses of finished attribution results (plain numpy/torch, no Trainer): leakage detection, ModelDiff."""
from .leakage import LeakagePair, LeakageReport, detect_leakage, load_store_features
from .modeldiff import DiffComponents, ModelDiffResult, load_modeldiff, modeldiff

__all__ = [
    "DiffComponents", "LeakagePair", "LeakageReport", "ModelDiffResult", "detect_leakage", "load_modeldiff",
    "load_store_features", "modeldiff",
]
