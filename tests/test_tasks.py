"""The task protocol against brute force: per-example output gradients (autograd, one example at a time, from
formulas written out here), Q against autograd of the loss with respect to the output, task detection, and
regression fidelity against exact leave-one-out retraining of ridge regression."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attrib.core import TRAK, Attributor, PerExampleGradients
from lightning_attrib.core.batches import BatchFormatError
from lightning_attrib.core.tasks import (CustomOutput, Logistic, MultiClass, Regression, TaskConfigError, TokenSequence, detect_task, model_prediction, read_batch, resolve_output)

torch.manual_seed(0)
B = 5


# -- modules and batches of every supported shape ----------------------------------------------------------------
class Tabular(nn.Module):
    """forward(x_cat, x_num): an embedding of a categorical column next to numeric columns."""

    def __init__(self, out=3):
        super().__init__()
        self.emb, self.lin = nn.Embedding(4, 2), nn.Linear(2 + 3, out)

    def forward(self, x_cat, x_num):
        return self.lin(torch.cat([self.emb(x_cat), x_num], dim=-1))


class HFText(nn.Module):
    """HuggingFace style: forward(input_ids, attention_mask) -> an object with .logits (or a dict)."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.emb, self.head, self.as_dict = nn.Embedding(11, 4), nn.Linear(4, 3), as_dict

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        logits = self.head(torch.tanh(h))
        if self.as_dict:
            return {"logits": logits, "hidden": h}
        return type("Out", (), {"logits": logits})()


class TinyLM(nn.Module):
    def __init__(self, vocab=7):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, 4), nn.Linear(4, vocab)

    def forward(self, input_ids):
        return {"logits": self.head(torch.tanh(self.emb(input_ids).cumsum(1)))}


def cases():
    x = torch.randn(B, 5)
    tokens = torch.randint(0, 11, (B, 6))
    mask = torch.ones(B, 6)
    mask[0, 4:] = 0
    lm_tokens = torch.randint(0, 7, (B, 6))
    causal_labels = lm_tokens.clone()
    causal_labels[1, :2] = -100
    masked_labels = torch.full((B, 6), -100)
    masked_labels[:, 2] = torch.randint(0, 7, (B,))
    masked_labels[:, 4] = torch.randint(0, 7, (B,))
    return {
        "multiclass": (nn.Linear(5, 3), (x, torch.randint(0, 3, (B,))), MultiClass),
        "binary": (nn.Linear(5, 1), (x, torch.tensor([0, 1, 1, 0, 1])), Logistic),
        "multilabel": (nn.Linear(5, 3), (x, torch.randint(0, 2, (B, 3)).float()), Logistic),
        "regression": (nn.Linear(5, 1), (x, torch.randn(B)), Regression),
        "regression-2d": (nn.Linear(5, 2), (x, torch.randn(B, 2)), Regression),
        "tabular": (Tabular(), (torch.randint(0, 4, (B,)), torch.randn(B, 3), torch.randint(0, 3, (B,))), MultiClass),
        "hf-object": (HFText(), {"input_ids": tokens, "attention_mask": mask, "labels": torch.randint(0, 3, (B,)),
                                 "idx": torch.arange(B)}, MultiClass),
        "hf-dict": (HFText(as_dict=True), {"input_ids": tokens, "attention_mask": mask,
                                           "label": torch.randint(0, 3, (B,))}, MultiClass),
        "causal-lm": (TinyLM(), {"input_ids": lm_tokens, "labels": causal_labels}, TokenSequence),
        "masked-lm": (TinyLM(), {"input_ids": lm_tokens, "labels": masked_labels}, TokenSequence),
    }


def reference_output(name, pred, target, kind):
    """The per-example output of one example, written from the definitions (float64)."""
    pred = pred.double()
    if name in ("multiclass", "tabular", "hf-object", "hf-dict"):
        logp = torch.log_softmax(pred, -1)[0, target[0]]
        return logp - torch.log1p(-logp.exp()) if kind == "margin" else -logp
    if name in ("binary", "multilabel"):
        p1 = torch.sigmoid(pred.reshape(-1))
        p_y = torch.where(target.reshape(-1) == 1, p1, 1 - p1)
        return (torch.log(p_y) - torch.log(1 - p_y)).sum() if kind == "margin" else -torch.log(p_y).sum()
    if name.startswith("regression"):
        z, y = pred.reshape(-1), target.reshape(-1).double()
        return (torch.sign(y - z.detach()) * z).sum() if kind == "margin" else 0.5 * ((z - y) ** 2).sum()
    total = pred.new_zeros(())
    shift = name == "causal-lm"
    for t in range(target.shape[1]):
        src = t - 1 if shift else t
        if src < 0 or target[0, t] == -100:
            continue
        logp = torch.log_softmax(pred[0, src], -1)[target[0, t]]
        total = total + (logp - torch.log1p(-logp.exp()) if kind == "margin" else -logp)
    return total


def one(batch, i):
    if isinstance(batch, dict):
        return {k: v[i:i + 1] for k, v in batch.items()}
    return tuple(v[i:i + 1] for v in batch)


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("kind", ["margin", "loss"])
def test_builtin_task_gradients_match_brute_force(name, kind):
    module, batch, task_cls = cases()[name]
    out = resolve_output(kind, module=module, sample=batch)
    assert isinstance(out.task, task_cls)
    if name == "causal-lm":
        assert out.task.shift and out.name == "causal-lm-" + kind
    if name == "masked-lm":
        assert not out.task.shift
    got = PerExampleGradients(module, out)(batch)
    names = [n for n, _ in module.named_parameters()]
    for i in range(B):
        pred, target = model_prediction(module, one(batch, i))
        value = reference_output(name, pred, target, kind)
        grads = torch.autograd.grad(value, list(module.parameters()), allow_unused=True)
        ref = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                         for g, p in zip(grads, module.parameters())])
        torch.testing.assert_close(got[i].double(), ref.double(), rtol=1e-4, atol=1e-5, msg=f"{name} {i} {names}")
        # the output itself matches the reference too
        torch.testing.assert_close(out(module, one(batch, i)).double().squeeze(), value.detach(), rtol=1e-5, atol=1e-6)


def _unit_margin_direction(name, task, pred, target):
    """A direction in prediction space that moves every part's margin by exactly 1 (see core/tasks.py)."""
    if isinstance(task, MultiClass):
        return F.one_hot(target.long(), pred.shape[-1]).to(pred.dtype)
    if isinstance(task, Logistic):
        return (2.0 * target.reshape(pred.shape).to(pred.dtype) - 1.0)
    if isinstance(task, Regression):
        return torch.where(target.reshape(pred.shape) - pred >= 0, 1.0, -1.0).to(pred.dtype)
    v = torch.zeros_like(pred)
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            src = t - 1 if task.shift else t
            if src >= 0 and target[b, t] != -100:
                v[b, src, target[b, t]] = 1.0
    return v


@pytest.mark.parametrize("name", list(cases()))
def test_loss_weight_is_minus_dloss_doutput(name):
    """Q = -dL/df, with autograd (forward-mode) of the loss and of the output along a unit-margin direction."""
    module, batch, _ = cases()[name]
    out = resolve_output("margin", module=module, sample=batch)
    task = out.task
    with torch.no_grad():
        pred, target = model_prediction(module, batch)
    pred = pred.double()
    v = _unit_margin_direction(name, task, pred, target)
    _, dloss = torch.func.jvp(lambda p: task.loss(p, target), (pred,), (v,))
    _, dmargin = torch.func.jvp(lambda p: task.margin(p, target), (pred,), (v,))
    q = out.loss_weight(module, batch).double()
    torch.testing.assert_close(q, -dloss / dmargin, rtol=1e-5, atol=1e-6)
    if isinstance(task, MultiClass):  # one margin per example: exact derivative along ANY direction
        r = torch.randn_like(pred)
        _, dl = torch.func.jvp(lambda p: task.loss(p, target), (pred,), (r,))
        _, dm = torch.func.jvp(lambda p: task.margin(p, target), (pred,), (r,))
        torch.testing.assert_close(q, -dl / dm, rtol=1e-4, atol=1e-6)
    # the loss output's own weight is 1 (it is its own loss)
    torch.testing.assert_close(resolve_output("loss", module=module, sample=batch).loss_weight(module, batch).double(),
                               torch.ones(B, dtype=torch.float64))


def test_reader_uses_forward_signature_and_last_element_as_target():
    x, meta, y = torch.randn(B, 5), torch.randn(B), torch.randint(0, 3, (B,))
    inputs, target = read_batch(nn.Linear(5, 3), (x, meta, y))  # forward(x): (x, meta_float, y) takes y
    assert len(inputs.args) == 1 and inputs.args[0] is x and target is y
    inputs, target = read_batch(Tabular(), (y, x[:, :3], y))
    assert len(inputs.args) == 2 and target is y
    with pytest.raises(BatchFormatError, match="needs 2 inputs"):
        read_batch(Tabular(), (x, y))
    inputs, target = read_batch(HFText(), {"input_ids": 1, "attention_mask": 2, "labels": 3, "id": 4})
    assert inputs.kwargs == {"input_ids": 1, "attention_mask": 2} and target == 3


@pytest.mark.parametrize("pred,target,match", [
    (torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0]), "float tensor"),
    (torch.randn(4, 3), torch.tensor([0, 1, 3, 1]), r"labels must be in \[0, 3\)"),
    (torch.randn(4, 1), torch.tensor([0, 1, 2, 1]), "outside"),
    (torch.randn(4, 3), torch.randint(0, 3, (5,)), "batch size"),
    (torch.randn(4, 6, 5), torch.randint(0, 5, (4, 2)), "no built-in task fits"),
    (torch.randn(4, 3), torch.tensor([[0.0], [1.0], [2.0], [1.0]]), "no built-in task fits"),
])
def test_detection_refuses_targets_that_do_not_fit(pred, target, match):
    with pytest.raises(TaskConfigError, match=match):
        task = detect_task(pred, target)
        task.check(pred, target)


def test_detection_picks_logistic_for_01_float_targets_and_regression_otherwise():
    assert isinstance(detect_task(torch.randn(4, 1), torch.tensor([0.0, 1.0, 1.0, 0.0])), Logistic)
    assert isinstance(detect_task(torch.randn(4, 1), torch.tensor([0.5, 1.0, 1.0, 0.0])), Regression)
    assert isinstance(detect_task(torch.randn(4, 2), torch.tensor([0, 1, 1, 0])), MultiClass)
    column = torch.tensor([[0], [2], [1], [2]])  # class indices as a (B, 1) column
    logits = torch.randn(4, 3)
    task = detect_task(logits, column)
    assert isinstance(task, MultiClass)
    torch.testing.assert_close(task.margin(logits, column), task.margin(logits, column.view(-1)))


def test_callable_output_must_say_its_q():
    fn = lambda m, b: m(b[0])[:, 0]  # noqa: E731
    with pytest.raises(TaskConfigError, match="use_q"):
        resolve_output(fn, method=TRAK())
    assert resolve_output(fn, method=TRAK(use_q=False)).name == "custom"
    out = resolve_output(CustomOutput(fn, loss_weight=lambda m, b: torch.full((len(b[0]),), 0.5)), method=TRAK())
    torch.testing.assert_close(out.loss_weight(nn.Linear(5, 3), (torch.randn(3, 5), None)), torch.full((3,), 0.5))


def test_regression_scores_match_exact_ridge_leave_one_out(tmp_path):
    """TRAK with the regression task (identity projector, damping = the ridge penalty) against exact leave-one-out
    retraining of ridge regression: the change of each query's prediction toward its target."""
    g = torch.Generator().manual_seed(0)
    n, d, lam = 60, 6, 0.5
    x = torch.randn(n + 15, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n + 15, generator=g, dtype=torch.float64)
    y[:6] += 4.0  # a few corrupted targets

    def fit(rows):
        xa = torch.cat([x[rows], torch.ones(len(rows), 1, dtype=torch.float64)], 1)
        return torch.linalg.solve(xa.T @ xa + lam * torch.eye(d + 1, dtype=torch.float64), xa.T @ y[rows])

    xq = torch.cat([x[n:], torch.ones(15, 1, dtype=torch.float64)], 1)
    w = fit(list(range(n)))
    full = xq @ w
    toward = torch.sign(y[n:] - full)
    loo = torch.stack([toward * (full - xq @ fit([j for j in range(n) if j != i])) for i in range(n)])  # (n, q)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:d].view(1, d))
        model.bias.copy_(w[d:])
    res = Attributor(model, TRAK(damping=lam), TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), tmp_path,
                     projector="identity", score_dtype="float64").run()
    assert res.manifest["output"] == "regression-margin"
    scores = np.asarray(res.scores, dtype=np.float64)
    r = np.corrcoef(scores.ravel(), loo.numpy().ravel())[0, 1]
    assert r >= 0.9, r
    # self-influence ranks the corrupted targets first
    assert set(np.argsort(-res.self_influence)[:6]) == set(range(6))


class NestedBatches(nn.Module):
    """Batches no reader understands; the module says how to read them with its one hook."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(5, 3)

    def forward(self, x):
        return self.net(x)

    def attribution_step(self, batch):
        return self(batch["features"]["a"]), batch["target"]["cls"]


def test_attribution_step_hook_takes_over_reading():
    module = NestedBatches()
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    batch = {"features": {"a": x}, "target": {"cls": y}}
    for kind in ("margin", "loss"):
        out = resolve_output(kind, module=module, sample=batch)
        assert out.name == f"attribution_step.{kind}" and isinstance(out.task, MultiClass)
        ref = resolve_output(kind, module=module.net, sample=(x, y))
        torch.testing.assert_close(PerExampleGradients(module, out)(batch), PerExampleGradients(module.net, ref)((x, y)))
        torch.testing.assert_close(out.loss_weight(module, batch), ref.loss_weight(module.net, (x, y)))


def test_huggingface_model_zero_config():
    """A HuggingFace sequence classifier (dict batches with extra keys, output object with .logits)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    batch = {"input_ids": torch.randint(0, 30, (B, 7)), "attention_mask": torch.ones(B, 7, dtype=torch.long),
             "token_type_ids": torch.zeros(B, 7, dtype=torch.long), "labels": torch.randint(0, 3, (B,)),
             "example_id": torch.arange(B)}
    out = resolve_output("margin", module=model, sample=batch)
    assert isinstance(out.task, MultiClass)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "example_id")}).logits
    from lightning_attrib.core.tasks import margin_from_logits

    torch.testing.assert_close(out(model, batch), margin_from_logits(logits, batch["labels"]))
