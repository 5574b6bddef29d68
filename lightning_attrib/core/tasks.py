"""The task protocol: how a batch becomes model inputs and targets, which per-example output is attributed, and its
loss weight Q = -d loss / d output (TRAK's Q).

Anchors: kronfluence's `Task`, dattri's `AttributionTask`. Three pieces, each one job:

* a *reader* turns a batch into `(ModelInputs, targets)` (`read_batch`: tuples, multi-input tuples, dict batches,
  HuggingFace-style keyword batches) and `model_prediction` runs the module and takes the prediction out of a
  tensor, a dict with `logits` or an object with `.logits`. A LightningModule can take this over with ONE method,
  `attribution_step(self, batch) -> (prediction, target)` (Lightning style, like `predict_step`); its prediction
  and target are taken as aligned (for a causal LM return them shifted, or pass `output_fn="causal-lm"`).
* a `Task` (the loss family) maps `(prediction, target)` to a "margin"-like output (TRAK), the per-example training
  loss (influence functions, TracIn, gradient similarity), Q, and what the report tables show. Built-ins:
  `MultiClass`, `Logistic` (binary and multi-label), `Regression`, `TokenSequence` (causal / masked LM and token
  classification: per-sequence sums, -100 ignored). `detect_task` picks one from the prediction and the targets.
* a `TaskOutput` binds reader, task and kind ("margin" or "loss") into what the pipeline and the projectors consume:
  a callable `(module, batch) -> (B,)` with `.loss_weight(module, batch) -> (B,)` and `.name`.

Q for several margins per example (labels, outputs, tokens): the per-example output is the sum of the per-part
margins, and Q is -dL/df along the direction that moves every part's margin by the same amount (the mean of the
parts' Q). For one part (multi-class, binary, one regression output) this is the exact derivative.
"""
from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import INPUT_KEYS, TARGET_KEYS, BatchFormatError

KINDS = ("margin", "loss")
IGNORE_INDEX = -100
DETECT_EXAMPLES = 32  # examples the task is detected from (0/1 float targets of a regression are unlikely in 32)
HOOK_NAME = "attribution_step"


class TaskConfigError(ValueError):
    """The batches, the module's output or the output function do not fit an attribution task; says what to change."""


# -- reading batches ---------------------------------------------------------------------------------------
@dataclass
class ModelInputs:
    """What `module(*args, **kwargs)` is called with."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _forward_signature(module: nn.Module) -> tuple[int, int, set[str], bool]:
    """(required positional, max positional (large for *args), keyword names, accepts **kwargs) of module.forward;
    computed once per forward function (the batch reader runs on every batch, also inside training steps)."""
    forward = module.forward
    func = getattr(forward, "__func__", None)
    if func is not None:
        return _method_signature(func)
    return _signature_counts(forward, skip_first=False)


@functools.lru_cache(maxsize=256)
def _method_signature(func: Callable) -> tuple[int, int, set[str], bool]:
    return _signature_counts(func, skip_first=True)


def _signature_counts(fn: Callable, skip_first: bool) -> tuple[int, int, set[str], bool]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 1, 1 << 30, set(), True
    req = n_pos = 0
    names, var_kw = set(), False
    for p in params[1:] if skip_first else params:   # a method's function: `self` first
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n_pos += 1
            req += p.default is p.empty
        if p.kind == p.VAR_POSITIONAL:
            n_pos = 1 << 30
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
        if p.kind == p.VAR_KEYWORD:
            var_kw = True
    return req, n_pos, frozenset(names), var_kw


def read_batch(module: nn.Module, batch: Any) -> tuple[ModelInputs, Any]:
    """`(inputs, targets)` of a batch for `module`.

    * tuple/list `(x, y)`; `(x1, ..., xn, y)`: the LAST element is the target and `forward`'s positional parameters
      say how many leading elements are inputs (`forward(x_cat, x_num)` takes two; `forward(x)` with
      `(x, meta, y)` takes x and y).
    * dict: the target is the first of TARGET_KEYS present. Keys that name `forward` parameters are passed as
      keyword arguments (HuggingFace style: `forward(input_ids, attention_mask)`); otherwise the first of INPUT_KEYS
      is passed positionally.
    """
    if isinstance(batch, Mapping):
        y_key = next((k for k in TARGET_KEYS if k in batch), None)
        if y_key is None:
            raise BatchFormatError(
                f"cannot find the targets in a dict batch with keys {sorted(batch)}: expected one of {TARGET_KEYS}. "
                f"Rename the label key, or define `{HOOK_NAME}(self, batch) -> (prediction, target)` on your "
                "LightningModule to tell lightning-attrib how to read your batches. Pass `output_fn=` for a custom "
                "output.")
        _, _, names, var_kw = _forward_signature(module)
        kwargs = {k: v for k, v in batch.items() if k != y_key and k in names}
        if kwargs:
            return ModelInputs((), kwargs), batch[y_key]
        x_key = next((k for k in INPUT_KEYS if k in batch), None)
        if x_key is not None:
            return ModelInputs((batch[x_key],)), batch[y_key]
        if var_kw:
            return ModelInputs((), {k: v for k, v in batch.items() if k != y_key}), batch[y_key]
        raise BatchFormatError(
            f"cannot find the inputs in a dict batch with keys {sorted(batch)}: no key names a parameter of "
            f"{type(module).__name__}.forward{_signature_text(module)} and none is one of {INPUT_KEYS}. Name the keys "
            f"after forward's parameters, or define `{HOOK_NAME}(self, batch) -> (prediction, target)` on your "
            "LightningModule to tell lightning-attrib how to read your batches. Pass `output_fn=` for a custom "
            "output.")
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        req, n_pos, _, _ = _forward_signature(module)
        n_inputs = max(1, min(len(batch) - 1, n_pos))
        if req > n_inputs:
            raise BatchFormatError(
                f"{type(module).__name__}.forward{_signature_text(module)} needs {req} inputs, but the batches are "
                f"tuples of {len(batch)} (inputs..., target). Return (inputs..., target) from your dataset, or define "
                f"`{HOOK_NAME}(self, batch) -> (prediction, target)` on your LightningModule.")
        return ModelInputs(tuple(batch[:n_inputs])), batch[-1]
    raise BatchFormatError(
        f"cannot read a batch of type {type(batch).__name__}: expected a tuple/list (inputs..., target) or a dict with "
        f"a label key ({TARGET_KEYS}). Define `{HOOK_NAME}(self, batch) -> (prediction, target)` on your "
        "LightningModule to tell lightning-attrib how to read your batches. Pass `output_fn=` for a custom "
        "output.")


def _signature_text(module: nn.Module) -> str:
    try:
        return str(inspect.signature(module.forward))
    except (TypeError, ValueError):
        return "(...)"


def prediction_tensor(out: Any) -> torch.Tensor:
    """The prediction in a module's output: a tensor, `out["logits"]`, `out.logits`, or a tuple's first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "prediction", "predictions", "output", "preds"):
            if key in out and isinstance(out[key], torch.Tensor):
                return out[key]
        raise TaskConfigError(f"the module returned a dict with keys {sorted(out)}, none of them 'logits': return the "
                              f"logits (or a dict with 'logits'), or define `{HOOK_NAME}` on your LightningModule")
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TaskConfigError(f"cannot find a prediction tensor in the module's output of type {type(out).__name__}: "
                          f"return the logits, a dict with 'logits' or an object with `.logits`, or define "
                          f"`{HOOK_NAME}(self, batch) -> (prediction, target)` on your LightningModule")


def model_prediction(module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`(prediction, target)` for a batch: the module's own `attribution_step` when it has one, else the reader."""
    hook = getattr(module, HOOK_NAME, None)
    if callable(hook):
        res = hook(batch)
        if not (isinstance(res, (tuple, list)) and len(res) == 2):
            raise TaskConfigError(f"{type(module).__name__}.{HOOK_NAME}(batch) must return (prediction, target), got "
                                  f"{type(res).__name__}")
        return prediction_tensor(res[0]), res[1]
    inputs, targets = read_batch(module, batch)
    return prediction_tensor(module(*inputs.args, **inputs.kwargs)), targets


# -- tasks (loss families) ------------------------------------------------------------------------------------
class Task(ABC):
    """A loss family on `(prediction, target)`: margin-like output, per-example loss, Q, and table display."""

    name: str = "task"

    @abstractmethod
    def margin(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) output that grows as the prediction gets better for its target (TRAK's f)."""

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) per-example training loss (influence functions, TracIn, gradient similarity)."""

    @abstractmethod
    def loss_weight(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) Q = -d loss / d margin (see the module docstring for several parts per example)."""

    def check(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Raise TaskConfigError (saying what to change) when the targets do not fit (dtype, shape, range)."""

    def display(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[list, list]:
        """Per-example (given label, prediction) for report tables."""
        return [_fmt(t) for t in target], [_fmt(p) for p in pred]

    def describe(self) -> dict:
        return {"task": self.name}


def _fmt(t: torch.Tensor):
    t = t.detach().cpu()
    if t.numel() == 1:
        v = t.item()
        return round(v, 4) if isinstance(v, float) else v
    return str([round(v, 3) if isinstance(v, float) else v for v in t.flatten()[:16].tolist()])


def margin_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p_y - log(1 - p_y) = logit_y - logsumexp(other logits), stable for any logit scale."""
    targets = targets.long().unsqueeze(-1)
    correct = logits.gather(-1, targets).squeeze(-1)
    others = logits.scatter(-1, targets, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


class MultiClass(Task):
    """Softmax classification, (B, C) logits and (B,) class indices: margin log p_y/(1-p_y), Q = 1 - p_y."""

    name = "multiclass"

    def margin(self, pred, target):
        return margin_from_logits(pred, target.reshape(-1))

    def loss(self, pred, target):
        return F.cross_entropy(pred, target.reshape(-1).long(), reduction="none")

    def loss_weight(self, pred, target):
        p = torch.softmax(pred.double(), dim=-1).gather(-1, target.long().view(-1, 1)).squeeze(-1)
        return (1.0 - p).float()

    def check(self, pred, target):
        _check_class_targets(target, pred.shape[-1], "(B, C) logits")
        if target.reshape(-1).shape != pred.shape[:1]:
            raise TaskConfigError(f"multi-class targets must have shape (B,) = {tuple(pred.shape[:1])} for logits of "
                                  f"shape {tuple(pred.shape)}, got {tuple(target.shape)}")

    def display(self, pred, target):
        return [int(t) for t in target], [int(p) for p in pred.argmax(-1)]


def _check_class_targets(target: torch.Tensor, num_classes: int, what: str) -> None:
    if target.is_floating_point():
        raise TaskConfigError(
            f"the targets are a float tensor ({target.dtype}) where {what} need integer class indices: return "
            "integer labels (`y.long()`) from your dataset, or, for regression, one output per target value "
            "(prediction and target of the same shape)")
    valid = target[target != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise TaskConfigError(f"class labels range over [{int(valid.min())}, {int(valid.max())}] but the module has "
                              f"{num_classes} outputs: labels must be in [0, {num_classes}) (resize the output layer or "
                              "remap the labels)")


class Logistic(Task):
    """Binary (one logit) or multi-label (one logit per label) sigmoid classification, 0/1 targets.

    Per label margin s z (s = 2y - 1, = log p(y)/(1 - p(y))); output = sum over labels; Q = mean of 1 - p(y_l)."""

    name = "logistic"

    @staticmethod
    def _signed(pred, target):
        z = pred.reshape(pred.shape[0], -1)
        s = 2.0 * target.reshape(z.shape).to(z.dtype) - 1.0
        return s * z

    def margin(self, pred, target):
        return self._signed(pred, target).sum(-1)

    def loss(self, pred, target):
        return F.softplus(-self._signed(pred, target)).sum(-1)

    def loss_weight(self, pred, target):
        return torch.sigmoid(-self._signed(pred.double(), target)).mean(-1).float()

    def check(self, pred, target):
        if target.numel() != pred.numel():
            raise TaskConfigError(f"binary/multi-label targets must have one 0/1 value per logit: logits "
                                  f"{tuple(pred.shape)}, targets {tuple(target.shape)}")
        if not torch.all((target == 0) | (target == 1)):
            raise TaskConfigError("binary/multi-label targets must be 0 or 1; for regression targets pass "
                                  "`output_fn='regression'`")

    def display(self, pred, target):
        return ([_fmt(t) for t in target.reshape(target.shape[0], -1).int()],
                [_fmt(p) for p in (pred.reshape(pred.shape[0], -1) > 0).int()])


class Regression(Task):
    """Squared error on one or more outputs. Margin: the prediction moved toward its target, s * pred with
    s = sign(target - pred) (held fixed), so Q = |residual| >= 0 and positive scores mean "moves the query's
    prediction toward its target", as for the classification margin. Loss: 0.5 * sum of squared errors."""

    name = "regression"

    @staticmethod
    def _flat(pred, target):
        z = pred.reshape(pred.shape[0], -1)
        return z, target.reshape(z.shape).to(z.dtype)

    def margin(self, pred, target):
        z, y = self._flat(pred, target)
        s = torch.where(y - z.detach() >= 0, 1.0, -1.0).to(z.dtype)
        return (s * z).sum(-1)

    def loss(self, pred, target):
        z, y = self._flat(pred, target)
        return 0.5 * ((z - y) ** 2).sum(-1)

    def loss_weight(self, pred, target):
        z, y = self._flat(pred.double(), target)
        return (y - z).abs().mean(-1).float()

    def check(self, pred, target):
        if target.numel() != pred.numel():
            raise TaskConfigError(f"regression needs one target value per output: predictions {tuple(pred.shape)}, "
                                  f"targets {tuple(target.shape)}")
        if not torch.isfinite(target.double()).all():
            raise TaskConfigError("regression targets hold NaN/inf: clean the targets")


class TokenSequence(Task):
    """Causal / masked language modeling and token classification: (B, T, V) logits, (B, T) token targets, -100
    ignored. `shift=True` (causal LM, targets = the inputs): position t predicts target t + 1. Output: sum of
    the token margins; loss: sum of token cross-entropies; Q: mean of 1 - p over the counted tokens."""

    def __init__(self, shift: bool):
        self.shift = shift
        self.name = "causal-lm" if shift else "token"

    def _align(self, pred, target):
        if self.shift:
            pred, target = pred[:, :-1], target[:, 1:]
        target = target.long()
        mask = target != IGNORE_INDEX
        return pred, torch.where(mask, target, 0), mask

    def margin(self, pred, target):
        z, y, m = self._align(pred, target)
        return (margin_from_logits(z, y) * m).sum(-1)

    def loss(self, pred, target):
        z, y, m = self._align(pred, target)
        ce = F.cross_entropy(z.transpose(1, 2), y, reduction="none")
        return (ce * m).sum(-1)

    def loss_weight(self, pred, target):
        z, y, m = self._align(pred.double(), target)
        p = torch.softmax(z, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return (((1.0 - p) * m).sum(-1) / m.sum(-1).clamp_min(1)).float()

    def check(self, pred, target):
        if pred.shape[:2] != target.shape:
            raise TaskConfigError(f"sequence targets must have shape (B, T) = {tuple(pred.shape[:2])} for logits "
                                  f"{tuple(pred.shape)}, got {tuple(target.shape)}")
        _check_class_targets(target, pred.shape[-1], "(B, T, V) token logits")
        counted = (self._align(pred, target)[2]).sum(-1)
        if (counted == 0).any():
            bad = int((counted == 0).nonzero()[0])
            raise TaskConfigError(f"sequence {bad} of the batch has no target token (all -100"
                                  f"{' after the causal shift' if self.shift else ''}): its output would be constant")

    def display(self, pred, target):
        z, y, m = self._align(pred, target)
        n = m.sum(-1)
        acc = ((z.argmax(-1) == y) & m).sum(-1)
        return [f"{int(k)} tokens" for k in n], [f"{int(a)}/{int(k)} tokens right" for a, k in zip(acc, n)]

    def describe(self) -> dict:
        return {"task": self.name, "shift": self.shift}


TASKS = {"multiclass": MultiClass, "classification": MultiClass, "logistic": Logistic, "binary": Logistic,
         "multilabel": Logistic, "regression": Regression, "causal-lm": lambda: TokenSequence(True),
         "masked-lm": lambda: TokenSequence(False), "token": lambda: TokenSequence(False)}


def detect_task(pred: torch.Tensor, target: Any, inputs: ModelInputs | None = None) -> Task:
    """Choose the built-in task from the prediction, the targets (and, for sequences, the inputs)."""
    if not isinstance(pred, torch.Tensor) or not pred.is_floating_point():
        raise TaskConfigError(f"the module's prediction must be a float tensor, got "
                              f"{getattr(pred, 'dtype', type(pred).__name__)}")
    if not isinstance(target, torch.Tensor):
        raise TaskConfigError(f"the target must be a tensor, got {type(target).__name__}: return tensors from your "
                              f"dataset, or define `{HOOK_NAME}(self, batch) -> (prediction, target)`")
    b = pred.shape[0]
    if target.shape[:1] != (b,):
        raise TaskConfigError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} disagree on the batch "
                              "size: is the target the last element of your batches (or the 'label(s)' key)?")
    integer = not target.is_floating_point()
    if pred.ndim == 3 and target.ndim == 2 and pred.shape[:2] == target.shape:
        if not integer:
            _check_class_targets(target, pred.shape[-1], "(B, T, V) token logits")
        return TokenSequence(shift=_is_causal(target, inputs))
    if pred.ndim == 2 and pred.shape[1] >= 2 and (target.ndim == 1 or target.shape[1:] == (1,)) and (
            integer or target.ndim == 1):  # class indices, also as a (B, 1) column
        if not integer:
            _check_class_targets(target, pred.shape[-1], "(B, C) logits")
        return MultiClass()
    if pred.numel() == target.numel():
        binary = bool(torch.all((target == 0) | (target == 1)))
        if integer and not binary:
            raise TaskConfigError(f"integer targets with values outside {{0, 1}} for a prediction of shape "
                                  f"{tuple(pred.shape)}: for classes return (B, C) logits; for regression return "
                                  "float targets (or pass `output_fn='regression'`)")
        return Logistic() if binary else Regression()
    raise TaskConfigError(
        f"no built-in task fits prediction {tuple(pred.shape)} and target {tuple(target.shape)} ({target.dtype}): "
        "multi-class needs (B, C) logits and (B,) class indices; binary/multi-label and regression one target value "
        "per output; language models (B, T, V) logits and (B, T) tokens. Define "
        f"`{HOOK_NAME}(self, batch) -> (prediction, target)` on your LightningModule, or pass `output_fn=`.")


def _is_causal(target: torch.Tensor, inputs: ModelInputs | None) -> bool:
    """Targets equal to the input tokens (where not -100) mean causal LM: position t predicts t + 1."""
    if inputs is None:
        return False
    tokens = inputs.kwargs.get("input_ids", inputs.args[0] if inputs.args else None)
    if not isinstance(tokens, torch.Tensor) or tokens.shape != target.shape:
        return False
    m = target != IGNORE_INDEX
    return bool(m.any()) and bool(torch.equal(tokens[m], target[m].to(tokens.dtype)))


# -- output functions: what the pipeline and the projectors call -------------------------------------------------
class OutputFunction:
    """Base class: `__call__(module, batch) -> (B,)`, `loss_weight(module, batch) -> (B,)` (Q), `name`.

    A subclass that does not override `loss_weight` says nothing about Q; methods that use Q (TRAK) refuse it."""

    name = "custom"

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any) -> torch.Tensor:
        return torch.ones_like(self(module, batch))

    @property
    def defines_loss_weight(self) -> bool:
        return type(self).loss_weight is not OutputFunction.loss_weight

    def describe(self) -> dict:
        return {"output": self.name}


def _model_inputs(module: nn.Module, batch: Any) -> ModelInputs | None:
    """The reader's inputs (to tell causal from masked LM), or None when the module's hook reads the batches."""
    return None if callable(getattr(module, HOOK_NAME, None)) else read_batch(module, batch)[0]


class TaskOutput(OutputFunction):
    """A task's margin or loss as an output function. `task=None`: chosen by `detect_task` at the first batch."""

    def __init__(self, kind: str = "margin", task: Task | None = None, hook: bool = False):
        if kind not in KINDS:
            raise ValueError(f"output kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.task, self.hook = kind, task, hook

    @property
    def name(self) -> str:
        base = self.kind if self.task is None or isinstance(self.task, MultiClass) else f"{self.task.name}-{self.kind}"
        return f"{HOOK_NAME}.{base}" if self.hook else base

    def resolve(self, module: nn.Module, batch: Any) -> Task:
        """Detect the task from one batch (eval mode, no grad) if not fixed yet; returns it."""
        if self.task is None:
            with torch.no_grad():
                pred, target = model_prediction(module, batch)
            self.task = detect_task(pred, target, _model_inputs(module, batch))
        return self.task

    def _prediction(self, module, batch):
        pred, target = model_prediction(module, batch)
        if self.task is None:  # lazily (callers without a sample batch): first call decides
            self.task = detect_task(pred.detach(), target, _model_inputs(module, batch))
        return pred, target

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        pred, target = self._prediction(module, batch)
        return getattr(self.task, self.kind)(pred, target)

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any) -> torch.Tensor:
        pred, target = self._prediction(module, batch)
        if self.kind == "loss":  # the loss output is its own loss: dL/dL = 1
            return torch.ones(pred.shape[0], device=pred.device)
        self.task.check(pred, target)
        return self.task.loss_weight(pred, target)

    def check(self, module: nn.Module, batch: Any) -> None:
        with torch.no_grad():
            pred, target = self._prediction(module, batch)
            self.task.check(pred, target)

    def describe(self) -> dict:
        d = {"output": self.name, "kind": self.kind, "hook": HOOK_NAME if self.hook else None}
        if self.task is not None:
            d.update(self.task.describe())
        return d


class ClassificationMargin(TaskOutput):
    """Multi-class margin log p_y - log(1 - p_y) (TRAK's output for classifiers), Q = 1 - p_y."""

    def __init__(self):
        super().__init__("margin", MultiClass())


class CrossEntropyLoss(TaskOutput):
    """Per-example softmax cross-entropy (the curvature code's GGN needs exactly this output)."""

    def __init__(self):
        super().__init__("loss", MultiClass())


class CustomOutput(OutputFunction):
    """A user callable `(module, batch) -> (B,)` and what its Q is: `loss_weight` a callable `(module, batch) -> (B,)`
    (= -d loss / d output), "ones" (Q = 1: the output is already loss-like), or None (unknown: methods that use Q
    refuse it before training)."""

    def __init__(self, fn: Callable[[nn.Module, Any], torch.Tensor], loss_weight: Callable | str | None = None,
                 name: str | None = None):
        if not callable(fn):
            raise TypeError(f"output_fn must be callable (module, batch) -> per-example scalar, got {type(fn).__name__}")
        if loss_weight is None:
            loss_weight = getattr(fn, "loss_weight", None)
        if not (loss_weight is None or loss_weight == "ones" or callable(loss_weight)):
            raise TypeError("loss_weight must be a callable (module, batch) -> (B,), 'ones', or None")
        self.fn, self._q = fn, loss_weight
        fname = name or getattr(fn, "__name__", "custom")
        self.name = "custom" if fname == "<lambda>" else fname

    @property
    def defines_loss_weight(self) -> bool:
        return self._q is not None

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        return self.fn(module, batch)

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if callable(self._q):
            return self._q(module, batch)
        return torch.ones_like(self.fn(module, batch))

    def describe(self) -> dict:
        return {"output": self.name, "kind": "custom",
                "loss_weight": None if self._q is None else ("ones" if self._q == "ones" else "custom")}


BUILTIN_OUTPUTS = {"margin": ClassificationMargin, "loss": CrossEntropyLoss}


def uses_loss_weight(method: Any) -> bool:
    """Whether a method multiplies by Q (TRAK with use_q=True)."""
    return bool(getattr(method, "needs_loss_weight", False) and getattr(method, "use_q", True))


def resolve_output(output: str | Task | OutputFunction | Callable | None = None, default: str = "margin", *,
                   module: nn.Module | None = None, sample: Any = None, method: Any = None, dataset: Any = None,
                   collate_fn: Callable | None = None) -> OutputFunction:
    """The output function to attribute.

    `output`: None or "margin"/"loss" (the built-in task is detected from the data; the kind defaults to the
    method's), a task name ("regression", "logistic", "multiclass", "causal-lm", "masked-lm") or `Task` instance,
    an `OutputFunction`, or a callable (it must say its Q: `CustomOutput(fn, loss_weight=...)`, when `method` uses Q).
    A module with `attribution_step(batch) -> (prediction, target)` supplies prediction and target itself.
    With `module` and a `sample` batch (or a `dataset` and its `collate_fn`: its first DETECT_EXAMPLES examples)
    the task is detected now (so `.name` is final); else at the first call.
    """
    kind = default if default in KINDS else "margin"
    hook = module is not None and callable(getattr(module, HOOK_NAME, None))
    if output is None or (isinstance(output, str) and output in KINDS):
        out: OutputFunction = TaskOutput(output or kind, None, hook)  # task detected below, or at the first call
    elif isinstance(output, str):
        name, _, k = output.partition(":")
        if name not in TASKS or (k and k not in KINDS):
            raise ValueError(f"unknown output {output!r}: use 'margin', 'loss', a task name {sorted(TASKS)} "
                             "(optionally ':margin' / ':loss'), a Task, an OutputFunction or a callable")
        out = TaskOutput(k or kind, TASKS[name](), hook)
    elif isinstance(output, Task):
        out = TaskOutput(kind, output, hook)
    elif isinstance(output, OutputFunction):
        out = output
    elif callable(output):
        out = CustomOutput(output)
    else:
        raise TypeError(f"output_fn must be a name, a Task, an OutputFunction or a callable, got {type(output).__name__}")
    if method is not None and uses_loss_weight(method) and not out.defines_loss_weight:
        raise TaskConfigError(
            f"output_fn {out.name!r} does not say what its loss weight Q (= -d loss / d output) is, and "
            f"method {getattr(method, 'name', method)!r} multiplies by Q: wrap it as "
            "`CustomOutput(fn, loss_weight=q_fn)` (q_fn(module, batch) -> (B,)) or `CustomOutput(fn, "
            "loss_weight='ones')`, or pass method_kwargs={'use_q': False}; or drop output_fn and define "
            f"`{HOOK_NAME}(self, batch) -> (prediction, target)` on your module to get a built-in task with its Q")
    detectable = module is not None and (sample is not None or dataset is not None)
    if isinstance(out, TaskOutput) and out.task is None and detectable:
        batch = sample if sample is not None else sample_batch(dataset, collate_fn, module_device(module),
                                                               DETECT_EXAMPLES)
        if batch is not None:
            was_training = module.training
            module.eval()
            try:
                task = out.resolve(module, batch)
            finally:
                module.train(was_training)
            if isinstance(task, MultiClass) and not out.hook:  # the classes the curvature code recognizes
                out = BUILTIN_OUTPUTS[out.kind]()
    return out


def sample_batch(dataset, collate_fn: Callable | None, device: torch.device | str | None, n: int = 2) -> Any:
    """The first `n` examples of a dataset as one batch (on `device`), or None for an empty dataset."""
    from torch.utils.data import DataLoader, Subset

    from .batches import move_to

    try:
        m = min(n, len(dataset))
    except TypeError:
        return None
    if m == 0:
        return None
    batch = next(iter(DataLoader(Subset(dataset, range(m)), batch_size=m, shuffle=False, collate_fn=collate_fn)))
    return move_to(batch, device) if device is not None else batch


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
