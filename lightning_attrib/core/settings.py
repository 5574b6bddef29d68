"""What a feature depends on, as one validated dataclass: the store's settings and the manifest's entry.

Anchor: kronfluence's `FactorArguments` / `ScoreArguments`. Validated once, in `__post_init__`, before any file is
written; `to_dict()` is what `features/<output>/settings.json` holds and what `manifest.json["features"]` shows, so
a store is reused exactly when this dict is equal (any difference recomputes the features).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .projection import DENSE_KINDS, FACTORIZED_KINDS

PROJECTOR_HELP = {
    "tensorsketch": "count sketches from layer hooks (the default)",
    "factorized": "Kronecker-factorized projection per layer",
    "rademacher": "dense +-1 projection",
    "gaussian": "dense Gaussian projection",
    "identity": "full per-example gradients, no projection",
}
NON_FINITE_POLICIES = ("raise", "exclude")


def check_projector(kind: object) -> str:
    """`kind` if it names a projector; else a ValueError listing every valid kind."""
    valid = sorted(set(FACTORIZED_KINDS) | set(DENSE_KINDS), key=lambda k: (list(PROJECTOR_HELP) + [k]).index(k))
    if kind not in valid:
        listing = "; ".join(f"{k!r} ({PROJECTOR_HELP.get(k, '')})" for k in valid)
        raise ValueError(f"projector must be one of: {listing}. Got {kind!r}.")
    return str(kind)


@dataclass(frozen=True)
class FeatureSettings:
    """Everything the per-example features depend on besides the weights and the data."""

    projector: str
    proj_dim: int | None          # None for "identity" (the features are the full gradients)
    seed: int
    output: str                   # the output function's name
    normalize: bool               # unit-norm features (method.normalize_features)
    params: str                   # SHA-1 of the attributed parameters' names and shapes
    num_params: int
    non_finite: str = "raise"     # "raise": a non-finite value is an error; "exclude": its rows are dropped and listed
    factorized_layout: str | None = None  # which layers a factorized/tensorsketch projector covers, and their k split
    train_features: str = "post-hoc"   # or "captured:<layout hash>": TRAK's train side from a GradientCapture

    def __post_init__(self):
        check_projector(self.projector)
        if self.projector == "identity":
            object.__setattr__(self, "proj_dim", None)
        elif not isinstance(self.proj_dim, int) or isinstance(self.proj_dim, bool) or self.proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer (e.g. 2048), got {self.proj_dim!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.non_finite not in NON_FINITE_POLICIES:
            raise ValueError(f"non_finite must be 'raise' (a NaN/inf output, feature or score is an error naming the "
                             f"example) or 'exclude' (those examples are dropped and listed in the manifest), got "
                             f"{self.non_finite!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["factorized_layout"] is None:
            del d["factorized_layout"]
        if d["train_features"] == "post-hoc":   # the default: stores written before the field existed stay valid
            del d["train_features"]
        return d
