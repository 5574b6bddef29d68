"""`AttributionCallback(method="influence")` with no other argument (issue #13): the automatic solver on logistic
regression (against exact leave-one-out), a BatchNorm CNN and a small transformer with padding masks (self-influence
finds flipped labels at least as well as the training loss, minus 0.03)."""
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attrib import AttributionCallback, load_results
from lightning_attrib.data import flip_labels, load_digits_tensors
from lightning_attrib.testing import digits_problem, mean_pearson, train_logreg
from tests.test_methods_influence import exact_loo

warnings.filterwarnings("ignore", ".*does not have many workers.*")
PAD = 0


class LitNet(L.LightningModule):
    """Any classifier net, cross-entropy, Adam (or frozen weights with lr=0)."""

    def __init__(self, net: nn.Module, lr: float = 1e-2, weight_decay: float = 0.0):
        super().__init__()
        self.net, self.lr, self.wd = net, lr, weight_decay

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.wd) if self.lr else \
            torch.optim.SGD(self.parameters(), lr=0.0)


def cnn() -> nn.Module:
    """Digits 8x8 CNN with BatchNorm (5,114 parameters: above the explicit solver's 5,000)."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 16, 10), )


class TinyTransformer(nn.Module):
    """Embedding + stock TransformerEncoder (padding mask, nested tensors on) + masked mean pool + head."""

    def __init__(self, vocab: int = 24, dim: int = 16, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        mask = tokens == PAD
        h = self.enc(self.emb(tokens), src_key_padding_mask=mask)
        keep = (~mask).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def token_data(n: int, seed: int = 0, length: int = 12, vocab: int = 24):
    """Label = whether token 1 occurs more often than token 2; variable lengths padded with 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    tokens[torch.arange(length)[None] >= lengths[:, None]] = PAD
    y = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
    return tokens, y


def fit(model, train, query, tmp_path, epochs, batch_size=32):
    attrib = AttributionCallback(method="influence", out_dir=tmp_path / "attrib", train_dataset=train,
                                 query_dataset=query)
    L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[attrib], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).fit(model, DataLoader(train, batch_size=batch_size, shuffle=True),
                                              DataLoader(query, batch_size=64))
    return load_results(tmp_path / "attrib")


def loss_auroc(model, train, flipped):
    model.eval()
    with torch.no_grad():
        x, y = train.tensors
        losses = F.cross_entropy(model(x), y, reduction="none")
    return roc_auc_score(flipped, losses.numpy())


def test_no_argument_influence_on_logistic_regression_predicts_exact_leave_one_out(tmp_path):
    """p = 650 <= 5000: "auto" takes the explicit solver with the GGN (= the Hessian of this convex model), on full
    gradients the pipeline asked for itself (the callback's default projector is "tensorsketch")."""
    problem = digits_problem()
    full = train_logreg(problem)
    removals = np.random.default_rng(0).choice(len(problem.y_train), 20, replace=False)
    effects = exact_loo(problem, full, removals)
    model = LitNet(nn.Linear(64, 10).double(), lr=0.0)          # frozen at the L2-regularized optimum
    model.net.load_state_dict(full.state_dict())
    train = TensorDataset(problem.x_train.double(), problem.y_train)
    query = TensorDataset(problem.x_query.double(), problem.y_query)
    res = fit(model, train, query, tmp_path, epochs=1)
    m = res.manifest
    assert m["solver"] == "explicit" and m["solver_requested"] == "auto" and m["matrix"] == "ggn"
    assert m["projector"] == "identity"
    r = mean_pearson(np.asarray(res.scores)[removals], -effects)
    print(f"\nno-argument influence on LR: solver {m['solver']}, LOO Pearson {r:.4f}")
    assert r >= 0.9


def test_no_argument_influence_on_a_batchnorm_cnn_finds_flipped_labels(tmp_path):
    x, y = load_digits_tensors()
    labels, flipped = flip_labels(y[:500].numpy(), 0.1, 10, seed=1)
    train = TensorDataset(x[:500], torch.from_numpy(labels))
    query = TensorDataset(x[500:540], y[500:540])
    L.seed_everything(0)
    model = LitNet(cnn(), lr=3e-3)
    res = fit(model, train, query, tmp_path, epochs=8)
    m = res.manifest
    auc, base = roc_auc_score(flipped, res.self_influence), loss_auroc(model, train, flipped)
    print(f"\nno-argument influence on a BN CNN: solver {m['solver']} ({m['solver_reason']}), AUROC {auc:.3f}, "
          f"loss baseline {base:.3f}")
    assert m["solver"] == "projected" and m["projector"] == "tensorsketch"
    assert auc >= base - 0.03


def test_no_argument_influence_on_a_small_transformer_finds_flipped_labels(tmp_path):
    tokens, y = token_data(400)
    labels, flipped = flip_labels(y.numpy(), 0.1, 2, seed=2)
    train = TensorDataset(tokens, torch.from_numpy(labels))
    qt, qy = token_data(40, seed=1)
    query = TensorDataset(qt, qy)
    L.seed_everything(0)
    model = LitNet(TinyTransformer(), lr=3e-3)
    res = fit(model, train, query, tmp_path, epochs=10)
    m = res.manifest
    auc, base = roc_auc_score(flipped, res.self_influence), loss_auroc(model, train, flipped)
    print(f"\nno-argument influence on a transformer: solver {m['solver']} ({m['solver_reason']}), AUROC {auc:.3f}, "
          f"loss baseline {base:.3f}")
    assert auc >= base - 0.03
    assert m["solver"] == "explicit" and m["projector"] == "identity"   # 2,642 parameters: the GGN through attention


def test_auto_with_full_gradients_requested_takes_ekfac_not_a_p_by_p_kernel():
    from lightning_attrib.core.methods import InfluenceFunction
    from lightning_attrib.core.outputs import CrossEntropyLoss

    net = cnn()                                   # 5,114 parameters: above max_params
    names = [n for n, _ in net.named_parameters()]
    method = InfluenceFunction()
    assert method.choose_projector(net, names, "tensorsketch", CrossEntropyLoss()) == "tensorsketch"
    assert method.solver == "projected" and method.needs_kernel
    method = InfluenceFunction()
    assert method.choose_projector(net, names, "identity", CrossEntropyLoss()) == "identity"
    assert method.solver == "ekfac" and method.matrix == "ggn" and not method.needs_kernel
    with pytest.raises(ValueError, match="tensorsketch"):   # EK-FAC cannot cover a tied weight
        tied = nn.Sequential(nn.Linear(80, 80), nn.ReLU(), nn.Linear(80, 80))
        tied[2].weight = tied[0].weight
        InfluenceFunction().choose_projector(tied, [n for n, _ in tied.named_parameters()], "identity",
                                             CrossEntropyLoss())


def test_solver_configuration_errors_come_before_featurization(tmp_path):
    from lightning_attrib.core import Attributor
    from lightning_attrib.core.methods import InfluenceFunction

    x, y = torch.randn(8, 80), torch.randint(0, 70, (8,))
    data = TensorDataset(x, y)
    with pytest.raises(ValueError, match="max_params=5000"):
        Attributor(nn.Linear(80, 70), InfluenceFunction(solver="explicit"), data, data, tmp_path / "a")
    class WithBilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(80, 80), nn.ReLU(), nn.Linear(80, 70))
            self.extra = nn.Bilinear(2, 2, 1)              # a module EK-FAC does not cover

        def forward(self, x):
            return self.body(x) + self.extra(x[:, :2], x[:, 2:4])

    tied = WithBilinear()
    with pytest.raises(ValueError, match="EK-FAC covers"):
        Attributor(tied, InfluenceFunction(solver="ekfac"), data, data, tmp_path / "b")
    assert not (tmp_path / "a" / "features").exists()
