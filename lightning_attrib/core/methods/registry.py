"""Method names -> classes: what `AttributionCallback(method="...")` and the Hydra `attribution` group accept."""
from __future__ import annotations

from .base import FeatureMethod
from .gradsim import GradientCosine, GradientDot
from .influence import InfluenceFunction
from .tracin import TracIn
from .trak import TRAK

METHODS: dict[str, type[FeatureMethod]] = {
    "trak": TRAK,
    "influence": InfluenceFunction,   # solver="auto" (default) | "explicit" | "cg" | "lissa" | "ekfac" | "projected"
    "tracin": TracIn,
    "grad-dot": GradientDot,
    "grad-cos": GradientCosine,
}


def make_method(name: str, **kwargs) -> FeatureMethod:
    """Build a method by name, validating its arguments now (a typo fails before training, not after)."""
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}: use one of {sorted(METHODS)}")
    try:
        return METHODS[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for method {name!r}: {err}") from None
