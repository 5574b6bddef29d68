"""Every method through AttributionCallback with its defaults (CheckpointCapture() default snapshots), on the text
transformer (dict batches, multi-class) and on the regression example (another task): one row per method, with
the influence solver chosen, the output attributed, where the training features came from (post hoc, the in-run
capture, or GradientCapture's snapshot windows), whether every score is finite, self-influence AUROC for the
corrupted labels/targets, the loss-baseline AUROC and the wall time of the fit.

    python benchmarks/check_all_methods.py
"""
import importlib.util
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, CheckpointCapture, GradientCapture

ROOT = Path(__file__).resolve().parents[1]

def load(name):
    spec = importlib.util.spec_from_file_location(name, str(ROOT / "examples" / f"{name}.py"))
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

text, reg = load("text_transformer"), load("regression")
ids, mask, labels = text.make_sentences(300, seed=0)
noisy, flipped = text.flip_labels(labels.numpy(), 0.1, 2, seed=0)
setups = {
    "text": (lambda: text.TextClassifier(), text.Sentences(ids, mask, torch.as_tensor(noisy)),
             text.Sentences(*text.make_sentences(60, seed=1)), flipped, 32),
}
x, y = reg.make_data(600, seed=0); rng = np.random.default_rng(0)
bad = np.zeros(len(y), bool); bad[rng.choice(len(y), 60, replace=False)] = True
yn = y.clone(); yn[bad] += 2.5
setups["regression"] = (lambda: reg.Regressor(), TensorDataset(x, yn), TensorDataset(*reg.make_data(100, seed=1)), bad, 64)
rows = []
for setup, (make, train, val, truth, bs) in setups.items():
    for method in ["trak", "influence", "tracin", "grad-dot", "grad-cos", "tracin+capture", "trak+capture",
                   "trak+capture!"]:
        L.seed_everything(0)
        out = tempfile.mkdtemp()
        m = method.split("+")[0]
        train_features = "capture" if method.endswith("!") else "auto"   # "!": captured even with dropout
        cbs = [CheckpointCapture(dirpath=f"{out}/snaps")]
        if "capture" in method:
            cbs.append(GradientCapture(query_dataset=None if m == "trak" else "val"))
        cb = AttributionCallback(method=m, out_dir=f"{out}/attrib", mislabeled=truth, train_features=train_features)
        t = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[*cbs, cb])
        t0 = time.perf_counter()
        try:
            t.fit(make(), DataLoader(train, batch_size=bs, shuffle=True), DataLoader(val, batch_size=100))
            r = cb.result
            ok = np.isfinite(np.asarray(r.scores)).all()
            source = r.manifest.get("train_features", "")
            source = source.get("source", "") if isinstance(source, dict) else str(source)[:24]
            rows.append((setup, method, r.manifest.get("solver", ""), r.manifest["output"], source, ok,
                         cb.metrics.get("attrib/mislabel/self_influence/auroc", float("nan")),
                         cb.metrics.get("attrib/mislabel/loss_baseline/auroc", float("nan")), time.perf_counter() - t0))
        except Exception as e:
            rows.append((setup, method, "ERROR", repr(e)[:300], "", False, 0, 0, 0))
for r in rows:
    print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.3f}" for v in r))
