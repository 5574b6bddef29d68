"""Ensembles across runs: the results of independently trained models (e.g. a seed sweep) merged into one.

TRAK's main lever for accuracy is averaging over models trained independently (Park et al. 2023, section 3):
the merged scores and self-influence are the means of the members'. The merged result is a standard result
(written by `core.results.write_result`, read by `load_results`), so metrics, reports and analyses work on it
unchanged. Members must describe the same attribution problem: same method and output, same training and query
ids in the same order, full score matrices of the same shape; anything else is refused with the reason.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from .results import AttributionResult, load_results, write_result

# manifest keys that must agree between members when they are present (a data fingerprint, when a result has one)
SAME_KEYS = ("method", "output", "n_train", "n_query", "constant_self_influence", "data_fingerprint",
             "train_fingerprint", "query_fingerprint")
ROW_BLOCK = 4096


class EnsembleMismatchError(ValueError):
    """The results given to `ensemble` do not describe the same attribution problem."""


def _check_members(dirs: list[Path], results: list[AttributionResult]) -> None:
    ref, ref_dir = results[0], dirs[0]
    for d, r in zip(dirs, results):
        if not r.has_scores:
            raise EnsembleMismatchError(
                f"{d} keeps only each query's top {r.top_k} (top_k={r.top_k}): a top-k result cannot be averaged "
                "(a training example outside one member's top k has no score there). Rerun the members with "
                "top_k=None (their feature stores are reused).")
    for d, r in zip(dirs[1:], results[1:]):
        for key in SAME_KEYS:
            a, b = ref.manifest.get(key), r.manifest.get(key)
            if (key in ref.manifest or key in r.manifest) and a != b:
                raise EnsembleMismatchError(f"cannot ensemble {ref_dir} and {d}: their {key!r} differ ({a!r} vs {b!r})."
                                            " Ensemble only results of the same method on the same data.")
        for what, a, b in (("train_ids", ref.train_ids, r.train_ids), ("query_ids", ref.query_ids, r.query_ids)):
            if a.shape != b.shape or not np.array_equal(a, b):
                raise EnsembleMismatchError(
                    f"cannot ensemble {ref_dir} and {d}: their {what} differ ({len(a)} vs {len(b)} ids"
                    f"{'' if a.shape != b.shape else ', same length, other ids or order'}). Members must score the "
                    "same training and query examples in the same order.")
        if r.scores.shape != ref.scores.shape or r.self_influence.shape != ref.self_influence.shape:
            raise EnsembleMismatchError(f"cannot ensemble {ref_dir} and {d}: scores {ref.scores.shape} vs "
                                        f"{r.scores.shape}, self-influence {ref.self_influence.shape} vs "
                                        f"{r.self_influence.shape}")


def mean_scores(results: Sequence[AttributionResult]) -> np.ndarray:
    """The members' score matrices averaged in float64, row block by row block (members stay memory-mapped)."""
    n, q = results[0].scores.shape
    out = np.empty((n, q), dtype=np.float32)
    for lo in range(0, n, ROW_BLOCK):
        acc = np.zeros((min(n, lo + ROW_BLOCK) - lo, q), dtype=np.float64)
        for r in results:
            acc += r.scores[lo:lo + ROW_BLOCK]
        out[lo:lo + ROW_BLOCK] = acc / len(results)
    return out


def ensemble(result_dirs: Sequence[str | os.PathLike] | str | os.PathLike, out_dir: str | os.PathLike
             ) -> AttributionResult:
    """Merge the attribution results in `result_dirs` (one per independently trained model) into `out_dir`.

    Scores and self-influence are the members' means (self-influence NaN where a member did not compute it);
    the manifest lists the members and their seeds. Returns the merged result (as `load_results(out_dir)`).
    """
    dirs = [Path(result_dirs)] if isinstance(result_dirs, (str, os.PathLike)) else [Path(d) for d in result_dirs]
    if not dirs:
        raise ValueError("ensemble needs at least one result directory")
    out = Path(out_dir)
    if out.resolve() in {d.resolve() for d in dirs}:
        raise ValueError(f"ensemble: out_dir {out} is one of the members; write the merged result elsewhere")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ValueError(f"ensemble: a member is listed twice in {[str(d) for d in dirs]}")
    results = [load_results(d) for d in dirs]
    _check_members(dirs, results)
    ref = results[0]
    computed = all(r.manifest.get("self_influence_computed", True) for r in results)
    self_influence = (np.mean([np.asarray(r.self_influence, dtype=np.float64) for r in results], axis=0) if computed
                      else np.full(len(ref.train_ids), np.nan))
    members = [{"dir": str(d.resolve()), **{k: r.manifest.get(k) for k in ("seed", "damping", "snapshots")}}
               for d, r in zip(dirs, results)]
    keep = ("method", "output", "projector", "proj_dim", "n_train", "n_query", "use_q", "damping_rule",
            "constant_self_influence", "score_dtype", "sign", "params", "num_params")
    manifest = {
        "lightning_attrib_version": __version__,
        **{k: ref.manifest[k] for k in keep if k in ref.manifest},
        "damping": [d for m in members for d in (m["damping"] or [])] if all(isinstance(m["damping"], list)
                                                                             for m in members) else None,
        "self_influence_computed": computed,
        "ensemble": {"num_models": len(results), "rule": "mean of the members' scores and self-influence",
                     "members": members},
    }
    return write_result(out, manifest=manifest, scores=mean_scores(results), self_influence=self_influence,
                        train_ids=ref.train_ids, query_ids=ref.query_ids)
