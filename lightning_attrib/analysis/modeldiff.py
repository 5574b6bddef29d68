"""ModelDiff (Shah, Park, Ilyas, Madry 2022): training directions one learning recipe uses and the other does not.

Given attribution results of recipes A and B on the same training and query sets:

1. Normalize: every query's attribution vector (a column of `scores`, over training examples) is scaled to
   unit L2 norm, so each query counts equally and only the *pattern* of attribution is compared.
2. Residualize: remove from each recipe's attributions what the other recipe's attributions express.
   `projection="per_query"` (default, as in the authors' reference implementation) removes from each
   query's A vector its component along the same query's B vector, and vice versa.
   `projection="subspace"` projects A's columns onto the orthogonal complement of B's span: the top-r left
   singular vectors of B's normalized score matrix, r the smallest rank whose singular values explain
   `explained_variance` of its squared Frobenius norm (or `rank_b=` given), and vice versa. It removes
   more (all of B's dominant directions, e.g. the class structure, from every query), which also removes
   part of a genuine difference when the two recipes share training examples in it. In the planted-stamp
   setting of `tests/test_modeldiff.py` (5 seeds, logistic regression and MLPs) per_query put 0.95-1.0
   stamped examples among the top-20 loadings of the B-A direction, subspace (0.9) 0.6-0.95.
3. PCA: the residual columns are the samples (centered over queries); the top principal directions are
   vectors over training examples ("distinguishing training directions"). Each is signed so that the query
   projections are positively skewed: the queries it affects most have positive projections, and training
   examples with positive loadings are the ones supporting those queries more under one recipe than the
   other.

`modeldiff(a, b).b_minus_a` holds the directions B uses but A does not, `.a_minus_b` the converse. For each
direction, `variance_a`/`variance_b` give the fraction of A's and B's (normalized, centered) attribution
variance along it: a genuine B-specific direction has variance_b well above variance_a.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.io import atomic_save_npy, atomic_write_text
from ..core.results import AttributionResult, load_results


@dataclass
class DiffComponents:
    """Principal directions of one recipe's residual attributions (one side of the diff)."""

    name: str
    directions: np.ndarray            # (n_components, n_train) unit-norm loadings over training examples
    projections: np.ndarray           # (n_query, n_components) each query's residual along each direction
    explained_variance_ratio: np.ndarray  # (n_components,) share of the residual's variance
    variance_a: np.ndarray            # (n_components,) share of A's normalized attribution variance
    variance_b: np.ndarray            # (n_components,) share of B's normalized attribution variance
    rank_removed: int                 # dimension of the other recipe's span projected out (0 for per_query)
    train_ids: np.ndarray
    query_ids: np.ndarray

    @property
    def n_components(self) -> int:
        return self.directions.shape[0]

    def _check(self, component: int) -> None:
        if not 0 <= component < self.n_components:
            raise IndexError(f"component {component} out of range: {self.name} has {self.n_components} components")

    def top_train(self, component: int = 0, k: int = 20, sign: str = "abs") -> tuple[np.ndarray, np.ndarray]:
        """(train ids, signed loadings) of the k training examples with the largest loadings on a direction.

        `sign`: "abs" ranks by |loading| (signs kept in the returned loadings), "positive"/"negative" by the
        signed loading.
        """
        self._check(component)
        v = self.directions[component]
        key = {"abs": -np.abs(v), "positive": -v, "negative": v}.get(sign)
        if key is None:
            raise ValueError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
        order = np.argsort(key, kind="stable")[:k]
        return self.train_ids[order], v[order]

    def top_queries(self, component: int = 0, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """(query ids, projections) of the k queries most affected along a direction (largest projections)."""
        self._check(component)
        p = self.projections[:, component]
        order = np.argsort(-p, kind="stable")[:k]
        return self.query_ids[order], p[order]

    def summary(self, k: int = 10) -> dict:
        comps = []
        for c in range(self.n_components):
            t_ids, t_load = self.top_train(c, k)
            q_ids, q_proj = self.top_queries(c, k)
            comps.append({
                "component": c,
                "explained_variance_ratio": float(self.explained_variance_ratio[c]),
                "variance_a": float(self.variance_a[c]), "variance_b": float(self.variance_b[c]),
                "top_train": [{"train_id": int(i), "loading": float(v), "sign": "+" if v >= 0 else "-"}
                              for i, v in zip(t_ids, t_load)],
                "top_queries": [{"query_id": int(i), "projection": float(v)} for i, v in zip(q_ids, q_proj)],
            })
        return {"name": self.name, "rank_removed": self.rank_removed, "components": comps}

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for key in ("directions", "projections", "explained_variance_ratio", "variance_a", "variance_b"):
            atomic_save_npy(out_dir / f"{key}.npy", getattr(self, key))


@dataclass
class ModelDiffResult:
    """Both sides of a ModelDiff comparison and the settings that produced them."""

    a_minus_b: DiffComponents
    b_minus_a: DiffComponents
    train_ids: np.ndarray
    query_ids: np.ndarray
    settings: dict = field(default_factory=dict)

    def summary(self, k: int = 10) -> dict:
        return {"settings": self.settings, "a_minus_b": self.a_minus_b.summary(k), "b_minus_a": self.b_minus_a.summary(k)}

    def report(self, k: int = 10, n_components: int | None = None) -> str:
        """Plain-text summary: per direction, variance shares, top training loadings and top queries."""
        lines = []
        for side in (self.a_minus_b, self.b_minus_a):
            lines.append(f"== {side.name} (removed rank {side.rank_removed}) ==")
            for c in range(min(side.n_components, n_components or side.n_components)):
                t_ids, t_load = side.top_train(c, k)
                q_ids, q_proj = side.top_queries(c, k)
                lines.append(f"  component {c}: explained {side.explained_variance_ratio[c]:.3f} of residual; "
                             f"variance A {side.variance_a[c]:.4f}, B {side.variance_b[c]:.4f}")
                lines.append("    train (loading): " + ", ".join(f"{i}({v:+.3f})" for i, v in zip(t_ids, t_load)))
                lines.append("    queries (proj):  " + ", ".join(f"{i}({v:+.3f})" for i, v in zip(q_ids, q_proj)))
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike, k: int = 20) -> Path:
        """Write `<side>/*.npy` arrays, `train_ids.npy`, `query_ids.npy` and `modeldiff.json` (settings, top lists)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.a_minus_b.save(out_dir / "a_minus_b")
        self.b_minus_a.save(out_dir / "b_minus_a")
        atomic_save_npy(out_dir / "train_ids.npy", self.train_ids)
        atomic_save_npy(out_dir / "query_ids.npy", self.query_ids)
        atomic_write_text(out_dir / "modeldiff.json", json.dumps(self.summary(k), indent=2, default=float))
        return out_dir


def load_modeldiff(out_dir: str | os.PathLike) -> ModelDiffResult:
    """Read back what `ModelDiffResult.save` wrote."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "modeldiff.json").read_text())
    train_ids, query_ids = np.load(out_dir / "train_ids.npy"), np.load(out_dir / "query_ids.npy")
    sides = {}
    for key in ("a_minus_b", "b_minus_a"):
        d = out_dir / key
        arrays = {n: np.load(d / f"{n}.npy") for n in
                  ("directions", "projections", "explained_variance_ratio", "variance_a", "variance_b")}
        sides[key] = DiffComponents(name=key, rank_removed=int(meta[key]["rank_removed"]), train_ids=train_ids,
                                    query_ids=query_ids, **arrays)
    return ModelDiffResult(sides["a_minus_b"], sides["b_minus_a"], train_ids, query_ids, meta.get("settings", {}))


# -- computation -------------------------------------------------------------------------------------
def _as_result(r: AttributionResult | str | os.PathLike, what: str) -> AttributionResult:
    if isinstance(r, AttributionResult):
        return r
    if isinstance(r, (str, os.PathLike)):
        return load_results(r)
    raise TypeError(f"{what} must be an AttributionResult or a result directory, got {type(r).__name__}")


def _check_same_sets(a: AttributionResult, b: AttributionResult) -> None:
    for split in ("train", "query"):
        ia, ib = np.asarray(getattr(a, f"{split}_ids")), np.asarray(getattr(b, f"{split}_ids"))
        if ia.shape != ib.shape:
            raise ValueError(f"ModelDiff needs both results on the same {split} set: result_a has {len(ia)} "
                             f"{split} examples, result_b {len(ib)}")
        if not np.array_equal(ia, ib):
            pos = int(np.flatnonzero(ia != ib)[0])
            n_diff = int((ia != ib).sum())
            raise ValueError(f"ModelDiff needs both results on the same {split} set in the same order: {n_diff} "
                             f"{split} ids differ, first at position {pos} ({ia[pos]} in result_a vs {ib[pos]} in result_b)")
    sa, sb = a.scores.shape, b.scores.shape
    if sa != sb:
        raise ValueError(f"score matrices differ in shape: result_a {sa}, result_b {sb}")


def normalize_columns(scores: np.ndarray) -> np.ndarray:
    """float64 copy with every query column scaled to unit L2 norm (all-zero columns stay zero)."""
    s = np.array(scores, dtype=np.float64)
    norms = np.linalg.norm(s, axis=0)
    s[:, norms > 0] /= norms[norms > 0]
    return s


def span_rank(singular_values: np.ndarray, explained_variance: float) -> int:
    """Smallest r whose top-r squared singular values reach `explained_variance` of their total."""
    energy = singular_values ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    return int(min(np.searchsorted(np.cumsum(energy) / total, explained_variance - 1e-12) + 1, len(energy)))


def _residual_subspace(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return x - basis @ (basis.T @ x)


def _residual_per_query(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    num = (x * y).sum(axis=0)
    den = (y * y).sum(axis=0)
    coef = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return x - y * coef


def _variance_share(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Share of the (centered over queries) total variance of columns x along each unit direction."""
    xc = x - x.mean(axis=1, keepdims=True)
    total = float((xc ** 2).sum())
    if total <= 0:
        return np.zeros(directions.shape[0])
    return ((directions @ xc) ** 2).sum(axis=1) / total


def _pca(residual: np.ndarray, n_components: int, center: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = residual - residual.mean(axis=1, keepdims=True) if center else residual
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    k = min(n_components, len(s))
    dirs = u[:, :k].T.copy()                    # (k, n_train)
    proj = r.T @ dirs.T                         # (n_query, k)
    total = float((s ** 2).sum())
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    # sign: the queries a direction affects most get positive projections (positive skew of projections)
    skew = (proj ** 3).sum(axis=0)
    flip = np.where(skew < 0, -1.0, 1.0)
    return dirs * flip[:, None], proj * flip[None, :], ratio


def modeldiff(result_a: AttributionResult | str | os.PathLike, result_b: AttributionResult | str | os.PathLike,
              n_components: int = 5, *, rank_a: int | None = None, rank_b: int | None = None,
              explained_variance: float = 0.9, projection: str = "per_query", center: bool = True) -> ModelDiffResult:
    """Compare two recipes' attributions on the same train and query sets (see the module doc).

    Args:
        result_a, result_b: attribution results (or their directories); train and query ids must match.
        n_components: principal directions kept per side.
        rank_a, rank_b: dimension of A's / B's span to project out (subspace mode only); default from
            `explained_variance`.
        explained_variance: share of a normalized score matrix's squared norm its removed span must explain.
        projection: "per_query" (default) or "subspace".
        center: center the residual columns over queries before the PCA (as PCA does).

    Returns a `ModelDiffResult` with `.a_minus_b` (directions A uses, B does not) and `.b_minus_a`.
    """
    if not isinstance(n_components, int) or n_components <= 0:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
    if projection not in ("subspace", "per_query"):
        raise ValueError(f"projection must be 'subspace' or 'per_query', got {projection!r}")
    if not 0 < explained_variance <= 1:
        raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}")
    a, b = _as_result(result_a, "result_a"), _as_result(result_b, "result_b")
    _check_same_sets(a, b)
    na, nb = normalize_columns(a.scores), normalize_columns(b.scores)

    ranks = {}
    if projection == "subspace":
        bases = {}
        for key, mat, given in (("a", na, rank_a), ("b", nb, rank_b)):
            u, s, _ = np.linalg.svd(mat, full_matrices=False)
            r = span_rank(s, explained_variance) if given is None else int(given)
            if not 0 <= r <= len(s):
                raise ValueError(f"rank_{key}={given} out of range: the score matrix has rank at most {len(s)}")
            bases[key], ranks[key] = u[:, :r], r
        res_a = _residual_subspace(na, bases["b"])
        res_b = _residual_subspace(nb, bases["a"])
    else:
        res_a, res_b = _residual_per_query(na, nb), _residual_per_query(nb, na)
        ranks = {"a": 0, "b": 0}

    train_ids, query_ids = np.asarray(a.train_ids), np.asarray(a.query_ids)
    sides = {}
    for name, res, removed in (("a_minus_b", res_a, ranks["b"]), ("b_minus_a", res_b, ranks["a"])):
        dirs, proj, ratio = _pca(res, n_components, center)
        sides[name] = DiffComponents(name=name, directions=dirs, projections=proj, explained_variance_ratio=ratio,
                                     variance_a=_variance_share(na, dirs), variance_b=_variance_share(nb, dirs),
                                     rank_removed=removed, train_ids=train_ids, query_ids=query_ids)
    settings = {"n_components": n_components, "projection": projection, "explained_variance": explained_variance,
                "rank_a": ranks["a"], "rank_b": ranks["b"], "center": center, "normalization": "unit-norm query columns",
                "result_a": str(a.out_dir), "result_b": str(b.out_dir)}
    return ModelDiffResult(sides["a_minus_b"], sides["b_minus_a"], train_ids, query_ids, settings)
