"""ModelDiff on digits: what does a recipe trained with a spurious patch rely on that a clean recipe does not?

Recipe A trains a small MLP on digits. Recipe B trains the same MLP on the same images, except that a 2x2
patch in the top-left corner is set to max on half of the training images of one class (a spurious
feature). Both are attributed with TRAK on their own training inputs (same ids) and on one query set in
which half of that class's test images carry the patch too. `modeldiff` then finds the training direction B
uses and A does not: its top loadings should be the stamped images, and its most affected queries the
stamped test images. Plain torch, no Trainer; ~15 s on 2 cores.

By default TRAK runs without its Q term (`use_q=False`): the patch makes the stamped images trivially easy
for B, and Q = 1 - p (the example's remaining loss) shrinks their whole rows towards 0, so with Q the B-A
direction shows them with *negative* loadings (B's attributions lean on them less). `--with-q` shows that.

    python examples/modeldiff_digits.py [--out-dir DIR] [--projection per_query|subspace] [--with-q]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_attrib.testing import train_mlp
from lightning_attrib.analysis import modeldiff
from lightning_attrib.core import TRAK, Attributor
from lightning_attrib.data import DIGITS_CORNER_PATCH, load_digits_tensors, stamp_patch





def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=None, help="where results go (default: a temporary directory)")
    ap.add_argument("--stamp-class", type=int, default=3)
    ap.add_argument("--stamp-fraction", type=float, default=0.5)
    ap.add_argument("--projection", choices=["per_query", "subspace"], default="per_query")
    ap.add_argument("--n-components", type=int, default=3)
    ap.add_argument("--with-q", action="store_true", help="TRAK with its Q term (see the module doc)")
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="modeldiff_digits_"))

    rng = np.random.default_rng(args.seed)
    x, y = load_digits_tensors()
    perm = rng.permutation(len(x))
    tr, q = perm[:1200], perm[1200:1500]
    x_a, y_tr, y_q = x[tr].clone(), y[tr], y[q]
    x_b, is_stamped = stamp_patch(x_a, y_tr, args.stamp_class, args.stamp_fraction, rng)
    x_q, is_stamped_q = stamp_patch(x[q], y_q, args.stamp_class, 0.5, rng)

    results = {}
    for name, x_train in (("A (clean)", x_a), ("B (stamped)", x_b)):
        model = train_mlp(x_train, y_tr, seed=args.seed)
        with torch.no_grad():
            acc = (model(x_q).argmax(1) == y_q).float().mean().item()
            others = x[q][y_q != args.stamp_class].clone()
            others[:, list(DIGITS_CORNER_PATCH)] = 1.0
            p_stamp = torch.softmax(model(others), 1)[:, args.stamp_class].mean().item()
        print(f"recipe {name}: query accuracy {acc:.3f}; mean p(class {args.stamp_class}) on other-class test "
              f"images with the patch {p_stamp:.3f}")
        key = name[0].lower()
        results[key] = Attributor(model, TRAK(use_q=args.with_q), TensorDataset(x_train, y_tr),
                                  TensorDataset(x_q, y_q), out / f"recipe_{key}", proj_dim=args.proj_dim,
                                  batch_size=256).run()

    md = modeldiff(results["a"], results["b"], n_components=args.n_components, projection=args.projection)
    print()
    print(md.report(k=10))
    ids, loadings = md.b_minus_a.top_train(0, 20)
    frac = is_stamped[ids].mean()
    signs = "".join("+" if v > 0 else "-" for v in loadings[is_stamped[ids]])
    q_frac = is_stamped_q[md.b_minus_a.top_queries(0, 10)[0]].mean()
    print(f"\nB-A component 0: {frac:.2f} of its top-20 training loadings are stamped images (base rate "
          f"{is_stamped.mean():.3f}; their signs {signs}); {q_frac:.2f} of its top-10 queries are stamped test images")
    print(f"results written to {md.save(out / 'modeldiff')}")


if __name__ == "__main__":
    main()
