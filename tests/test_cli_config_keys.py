"""Every `attribution.*` key of the shipped Hydra configs reaches the API: the train app's callbacks and the
`attribute` app's call of `lightning_attrib.attribute` (a key the code ignores fails here); an unknown key is an
error before training."""
import functools

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lightning_attrib import cli

# Values other than the defaults, for keys whose default gives no obvious other value (None, strings, dicts).
SENTINELS = {"method": "grad-dot", "projector": "rademacher", "method_kwargs": {"damping_ratio": 0.5}, "top_k": 5,
             "keep_snapshots": 2, "snapshot_every_n_epochs": 2, "non_finite": "exclude"}


def _compose(config: str, tmp_path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="lightning_attrib.conf"):
        return compose(config, overrides=[f"out_dir={tmp_path}", *overrides])


def _sentinel(key: str, default):
    if key in SENTINELS:
        return SENTINELS[key]
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    pytest.fail(f"attribution.{key} (default {default!r}): add a non-default value to SENTINELS")


def _override(key: str, value) -> str:
    if isinstance(value, dict):  # method_kwargs is empty by default: its keys are added with `+`
        (k, v), = value.items()
        return f"+attribution.{key}.{k}={v}"
    return f"attribution.{key}={value}"


def _callback_state(cfg) -> dict:
    return {(type(cb).__name__, name): val for cb in cli.instantiate_callbacks(cfg) for name, val in vars(cb).items()}


def _same(a, b) -> bool:
    try:
        return bool(np.all(a == b)) if type(a) is type(b) else False
    except Exception:
        return repr(a) == repr(b)


def _keys(tmp_path, config: str) -> dict:
    return OmegaConf.to_container(_compose(config, tmp_path).attribution, resolve=True)


@pytest.mark.parametrize("key", list(_keys("/tmp", "train")))
def test_train_app_passes_every_attribution_key_to_a_callback(key, tmp_path):
    default = _keys(tmp_path, "train")[key]
    value = _sentinel(key, default)
    base = _callback_state(_compose("train", tmp_path))
    changed = _callback_state(_compose("train", tmp_path, _override(key, value)))
    differing = {k: v for k, v in changed.items() if not _same(v, base.get(k))}
    assert differing, f"attribution.{key}={value!r} changed no callback argument: the train app ignores it"
    assert any(_same(v, value) for v in differing.values()), (key, differing)


@pytest.mark.parametrize("key", list(_keys("/tmp", "attribute")))
def test_attribute_app_passes_every_scoring_key(key, tmp_path, monkeypatch):
    import lightning_attrib.standalone as standalone

    calls = []

    class Result:
        manifest, top_k, n_query, scores = {"method": "x", "world_size": 1}, None, 1, np.zeros((1, 1))

    @functools.wraps(standalone.attribute)  # same signature: the app checks keys against it
    def record(*args, **kwargs):
        calls.append(kwargs)
        return Result()

    monkeypatch.setattr(standalone, "attribute", record)
    value = _sentinel(key, _keys(tmp_path, "attribute")[key])
    for overrides in ([], [_override(key, value)]):
        cli.attribute(_compose("attribute", tmp_path, "snapshots=none", "data.n_train=20", "data.n_val=5",
                               *overrides))
    base, changed = calls
    if key in cli.CAPTURE_KEYS:  # snapshot capture during training: no meaning when scoring saved snapshots
        assert key not in changed and base == changed
    else:
        assert changed[key] == value and base[key] != value
        assert set(_keys(tmp_path, "attribute")) - set(cli.CAPTURE_KEYS) <= set(changed)


def test_capture_keys_are_the_checkpoint_capture_settings(tmp_path):
    state = _callback_state(_compose("train", tmp_path, "attribution.snapshot_every_n_epochs=3",
                                     "attribution.keep_snapshots=4"))
    assert state[("CheckpointCapture", "every_n_epochs")] == 3 and state[("CheckpointCapture", "keep")] == 4


def test_an_unknown_attribution_key_fails_before_training(tmp_path):
    cfg = _compose("train", tmp_path, "+attribution.proj_dims=64")
    with pytest.raises(ValueError, match=r"attribution\.proj_dims is not a setting"):
        cli.train(cfg)
    assert not (tmp_path / "attrib").exists() and not (tmp_path / "snapshots").exists()
    assert cli.attribution_kwargs(_compose("train", tmp_path).attribution)["proj_dim"] == 2048


def test_each_app_checks_keys_against_the_api_it_calls(tmp_path):
    # num_suspects is a reporting setting of the callback: it reaches the train app's callback, and is no
    # scoring setting of lightning_attrib.attribute
    cfg = _compose("train", tmp_path, "+attribution.num_suspects=3")
    assert _callback_state(cfg)[("AttributionCallback", "num_suspects")] == 3
    with pytest.raises(ValueError, match=r"attribution\.num_suspects is not a setting of lightning_attrib\.attribute"):
        cli.attribution_kwargs(cfg.attribution, api="attribute")


def test_a_callback_config_contradicting_the_attribution_group_is_an_error(tmp_path):
    cfg = _compose("train", tmp_path, "+callbacks.attribution.proj_dim=64")
    with pytest.raises(ValueError, match=r"callbacks\.attribution\.proj_dim=64 contradicts attribution\.proj_dim=2048"):
        cli.instantiate_callbacks(cfg)
    same = _compose("train", tmp_path, "+callbacks.attribution.proj_dim=2048")
    assert _callback_state(same)[("AttributionCallback", "proj_dim")] == 2048
