"""Every configuration error is raised before the first training step (trainer.global_step == 0), with a message
that says what to change; data views keep the fit loaders' collate_fn; settings reach the loggers."""
import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_attrib import AttributionCallback, load_results
from lightning_attrib.core.preflight import NondeterministicDatasetWarning
from lightning_attrib.data import load_digits_tensors
from lightning_attrib.models import LitClassifier

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def digits(n_train=40, n_val=10):
    x, y = load_digits_tensors()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val])


def make_trainer(tmp_path, cb, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[cb], enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     **{"logger": False, **kw})


def fails_before_training(tmp_path, model, cb, train, val, exc, match, collate_fn=None):
    t = make_trainer(tmp_path, cb)
    with pytest.raises(exc, match=match):
        t.fit(model, DataLoader(train, batch_size=10, collate_fn=collate_fn),
              DataLoader(val, batch_size=10, collate_fn=collate_fn))
    assert t.global_step == 0
    assert not (tmp_path / "attrib" / "scores.npy").exists()
    return t


class Scale(nn.Module):
    """An elementwise scale: a parameter outside every layer kind the engine (and so EK-FAC) covers."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.w


class Net(L.LightningModule):
    """A generic module: forward(*inputs) -> self.net(...), MSE or cross-entropy training."""

    def __init__(self, net, loss="ce"):
        super().__init__()
        self.net, self.loss_kind = net, loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        out = self(batch[0])
        return F.mse_loss(out.squeeze(-1), batch[-1].float()) if self.loss_kind == "mse" else F.cross_entropy(out, batch[-1])

    def validation_step(self, batch, i):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_float_targets_in_a_classification_slot(tmp_path):
    train, val = digits()
    train = TensorDataset(train.tensors[0], train.tensors[1].float())
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib"),
                          train, val, ValueError, r"float tensor.*\(`y.long\(\)`\)")


def test_labels_out_of_range(tmp_path):
    train, val = digits()
    val = TensorDataset(val.tensors[0], val.tensors[1] + 10)  # the query labels are out of range
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib"),
                          train, val, ValueError, r"query examples.*labels must be in \[0, 10\)")


def test_custom_output_without_q(tmp_path):
    with pytest.raises(ValueError, match=r"loss_weight=q_fn.*use_q"):
        AttributionCallback(output_fn=lambda m, b: m(b[0])[:, 0])  # constructor: before any Trainer exists
    from lightning_attrib.core import TRAK

    train, val = digits()
    cb = AttributionCallback(method=TRAK(), output_fn=lambda m, b: m(b[0])[:, 0], out_dir=tmp_path / "attrib")
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, val, ValueError, "CustomOutput")


def test_unreadable_batches(tmp_path):
    class Opaque(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"pixels": torch.zeros(64), "cls": torch.tensor(0)}

    class M(LitClassifier):
        def training_step(self, batch, i):
            return F.cross_entropy(self(batch["pixels"]), batch["cls"])

        def validation_step(self, batch, i):
            pass

    fails_before_training(tmp_path, M(arch="logreg"), AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib"),
                          Opaque(), Opaque(), TypeError, "attribution_step")


def test_forward_needs_more_inputs_than_the_batches_hold(tmp_path):
    class TwoInputs(Net):
        def forward(self, x_cat, x_num):
            return self.net(x_num)

        def training_step(self, batch, i):
            return F.cross_entropy(self(None, batch[0]), batch[1])

    train, val = digits()
    fails_before_training(tmp_path, TwoInputs(nn.Linear(64, 10)), AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib"),
                          train, val, TypeError, r"needs 2 inputs.*\(inputs\.\.\., target\)")


def test_dict_output_without_logits(tmp_path):
    class DictOut(Net):
        def forward(self, x):
            return {"scores": self.net(x)}

        def training_step(self, batch, i):
            return F.cross_entropy(self(batch[0])["scores"], batch[1])

    train, val = digits()
    fails_before_training(tmp_path, DictOut(nn.Linear(64, 10)), AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib"),
                          train, val, ValueError, "none of them 'logits'")


def test_query_inputs_of_another_shape(tmp_path):
    train, val = digits()
    val = TensorDataset(val.tensors[0][:, :60], val.tensors[1])
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib", query_dataset=val)
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, digits()[1], RuntimeError,
                          r"query examples.*shapes cannot be multiplied \(2x60 and 64x10\)")


def test_empty_query_dataset(tmp_path):
    train, val = digits()
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib", query_dataset=TensorDataset(torch.zeros(0, 64),
                                                                                                  torch.zeros(0).long()))
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, val, ValueError,
                          "query_dataset is empty: pass query_dataset=")


def test_explicit_influence_over_the_parameter_limit(tmp_path):
    train, val = digits()
    cb = AttributionCallback(method="influence", method_kwargs={"solver": "explicit", "max_params": 100},
                             projector="identity", out_dir=tmp_path / "attrib")
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, val, ValueError,
                          r"above max_params=100.*restrict params=, or raise max_params")


def test_ggn_curvature_with_a_regression_task(tmp_path):
    x = torch.randn(30, 4)
    train, val = TensorDataset(x[:20], x[:20, 0]), TensorDataset(x[20:], x[20:, 0])
    cb = AttributionCallback(method="influence", method_kwargs={"solver": "cg", "matrix": "ggn"}, projector="identity",
                             out_dir=tmp_path / "attrib")
    fails_before_training(tmp_path, Net(nn.Linear(4, 1), "mse"), cb, train, val, ValueError, "matrix='hessian'")


def test_ekfac_with_an_unsupported_layer(tmp_path):
    train, val = digits()
    model = Net(nn.Sequential(nn.Linear(64, 16), Scale(16), nn.Linear(16, 10)))
    cb = AttributionCallback(method="influence", method_kwargs={"solver": "ekfac"}, projector="identity",
                             out_dir=tmp_path / "attrib")
    fails_before_training(tmp_path, model, cb, train, val, ValueError, "EK-FAC")


def test_mislabeled_mask_of_the_wrong_length(tmp_path):
    train, val = digits()
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib", mislabeled=np.zeros(39, dtype=bool))
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, val, ValueError,
                          r"mislabeled mask has shape \(39,\), expected \(40,\): one flag per training example")


def test_table_display_hook_that_fails(tmp_path):
    train, val = digits()
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib", to_display=lambda x: x["text"])
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, val, IndexError,
                          "to_image/to_display failed on train example 0.*fix or drop them")


def test_params_selecting_nothing(tmp_path):
    train, val = digits()
    cb = AttributionCallback(proj_dim=8, params=["decoder."], out_dir=tmp_path / "attrib")
    fails_before_training(tmp_path, LitClassifier(arch="logreg"), cb, train, val, ValueError,
                          "match no trainable parameter")


def test_non_finite_outputs_at_the_initial_weights(tmp_path):
    train, val = digits()
    model = LitClassifier(arch="logreg")
    with torch.no_grad():
        model.net.bias[0] = float("nan")
    fails_before_training(tmp_path, model, AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib"), train, val,
                          ValueError, r"non-finite .*for train example \d.*Check that example and the model.s numerics")


def test_out_dir_holding_features_of_other_settings_is_recomputed_not_refused(tmp_path):
    """Re-running into the same out_dir with other settings (a user's script with another proj_dim or seed) is never
    an error after training: the store is recomputed and the result equals a fresh run's."""
    train, val = digits()

    def run(out_dir, **kw):
        L.seed_everything(0)
        make_trainer(tmp_path, AttributionCallback(out_dir=out_dir, **kw)).fit(
            LitClassifier(arch="logreg"), DataLoader(train, batch_size=10), DataLoader(val, batch_size=10))
        return load_results(out_dir)

    run(tmp_path / "attrib", proj_dim=8)
    with pytest.warns(RuntimeWarning, match="proj_dim"):
        again = run(tmp_path / "attrib", proj_dim=16, seed=3)
    fresh = run(tmp_path / "fresh", proj_dim=16, seed=3)
    assert again.manifest["proj_dim"] == 16
    np.testing.assert_array_equal(np.asarray(again.scores), np.asarray(fresh.scores))


def test_augmenting_dataset_warns_and_names_the_fix(tmp_path):
    class Augmented(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y = self.base[i]
            return x + 0.1 * torch.randn_like(x), y

    train, val = digits()
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib")
    with pytest.warns(NondeterministicDatasetWarning, match=r"train_dataset=.*attribution_dataset\(self, split\)"):
        make_trainer(tmp_path, cb).fit(LitClassifier(arch="logreg"), DataLoader(Augmented(train), batch_size=10),
                                       DataLoader(val, batch_size=10))


def _dict_collate(items):
    return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


class DictModel(LitClassifier):
    def training_step(self, batch, i):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, i):
        pass


def test_views_keep_the_fit_loaders_collate_fn(tmp_path):
    """train_dataset= / query_dataset= (clean views) are collated like the fit's loaders unless collate_fn= is given."""
    train, val = digits()
    L.seed_everything(0)
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib", train_dataset=train, query_dataset=val)
    make_trainer(tmp_path, cb).fit(DictModel(arch="logreg"), DataLoader(train, batch_size=10, collate_fn=_dict_collate),
                                   DataLoader(val, batch_size=10, collate_fn=_dict_collate))
    assert load_results(tmp_path / "attrib").scores.shape == (40, 10)


def test_datamodule_attribution_dataset_hook_gives_the_clean_view(tmp_path):
    train, val = digits()
    noisy_x = train.tensors[0] + torch.randn_like(train.tensors[0])

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(noisy_x, train.tensors[1]), batch_size=10)

        def val_dataloader(self):
            return DataLoader(val, batch_size=10)

        def attribution_dataset(self, split):
            return train if split == "train" else None

    L.seed_everything(0)
    model = LitClassifier(arch="logreg")
    cb = AttributionCallback(proj_dim=8, projector="identity", out_dir=tmp_path / "attrib")
    make_trainer(tmp_path, cb).fit(model, datamodule=DM())
    # reference: the same weights through the clean view directly
    from lightning_attrib.core import TRAK, Attributor

    ref = Attributor(model, TRAK(), train, val, tmp_path / "ref", projector="identity").run()
    np.testing.assert_allclose(np.asarray(cb.result.scores), np.asarray(ref.scores), rtol=1e-5, atol=1e-7)


def test_settings_logged_as_hyperparameters_and_features_removed(tmp_path):
    train, val = digits()
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    cb = AttributionCallback(proj_dim=8, out_dir=tmp_path / "attrib", keep_features=False)
    make_trainer(tmp_path, cb, logger=logger).fit(LitClassifier(arch="logreg"), DataLoader(train, batch_size=10),
                                                  DataLoader(val, batch_size=10))
    import yaml

    hp = yaml.safe_load((logger.log_dir + "/hparams.yaml") and open(logger.log_dir + "/hparams.yaml"))
    assert hp["attribution"]["method"] == "trak" and hp["attribution"]["proj_dim"] == 8
    assert hp["attribution"]["output"] == "margin" and hp["attribution"]["task"]["task"] == "multiclass"
    assert not (tmp_path / "attrib" / "features").exists()
    assert load_results(tmp_path / "attrib").scores.shape == (40, 10)
    assert json.loads((tmp_path / "attrib" / "manifest.json").read_text())["output"] == "margin"


def test_meta_column_is_not_taken_as_the_target(tmp_path):
    """`(x, meta_float, y)` batches with forward(x): the target is y (the last element), the scores equal those of
    `(x, y)` batches."""
    train, val = digits()
    meta = lambda d: TensorDataset(d.tensors[0], torch.rand(len(d)), d.tensors[1])  # noqa: E731
    scores = {}
    for name, (tr, va) in {"xy": (train, val), "xmy": (meta(train), meta(val))}.items():
        L.seed_everything(0)

        class M(LitClassifier):
            def training_step(self, batch, i):
                return F.cross_entropy(self(batch[0]), batch[-1])

            def validation_step(self, batch, i):
                pass

        cb = AttributionCallback(proj_dim=16, out_dir=tmp_path / name)
        make_trainer(tmp_path, cb).fit(M(arch="logreg"), DataLoader(tr, batch_size=10), DataLoader(va, batch_size=10))
        scores[name] = np.asarray(cb.result.scores)
    np.testing.assert_allclose(scores["xmy"], scores["xy"], rtol=1e-5, atol=1e-8)


def test_numerics_of_two_examples_are_not_configuration_errors(tmp_path):
    """CG on the indefinite Hessian of two examples fails where the run may not: a warning, not an error; a true
    configuration error (EK-FAC on a layer it does not cover) is still raised although it also fails with strong damping."""
    from lightning_attrib.core.methods import make_method
    from lightning_attrib.core.preflight import preflight

    train, val = digits(100, 10)
    torch.manual_seed(0)
    model = LitClassifier(arch="mlp", hidden=32)
    with pytest.warns(RuntimeWarning, match="works with more damping"):
        report = preflight(model, make_method("influence", solver="cg", matrix="hessian"), train, val,
                           tmp_path / "attrib", projector="identity")
    assert report.output == "loss" and not (tmp_path / "attrib" / "features").exists()
    with pytest.raises(ValueError, match="EK-FAC"):
        preflight(Net(nn.Sequential(nn.Linear(64, 8), Scale(8), nn.Linear(8, 10))),
                  make_method("influence", solver="ekfac"), train, val, tmp_path / "attrib", projector="identity")
