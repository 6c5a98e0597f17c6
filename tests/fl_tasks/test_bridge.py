"""The Flower bridge (fl_tasks/bridge.py): real ClientApps called as a SuperNode would call them.

The example digits ClientApp runs on data written by ``examples/digits/data.py``; small probe
ClientApps (a module written to ``tmp_path`` and imported by ``module:attr``, as a job names its
app) show exactly what reaches the app and how malformed replies are refused.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.digits.data import load_split, prepare
from examples.digits.model import initial_state
from fl_tasks.bridge import (
    ClientAppError,
    Reply,
    call_client_app,
    load_client_app,
    load_object,
    node_config,
    run_client_app,
    silo_node_id,
)
from fl_tasks.records import ObjectRef, Plan, PlanSilo, RegistryNames
from fl_tasks.spec import Strategy

DIGITS_APP = "examples.digits.client_app:app"

PROBE = '''
"""Probe ClientApps for the bridge tests."""
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

SEEN = []


def _remember(msg, context):
    SEEN.append({
        "message_type": msg.metadata.message_type,
        "group_id": msg.metadata.group_id,
        "dst_node_id": msg.metadata.dst_node_id,
        "config": dict(msg.content["config"]),
        "array_keys": sorted(msg.content["arrays"].keys()),
        "node_id": context.node_id,
        "run_id": context.run_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
    })


echo = ClientApp()


@echo.train()
def echo_train(msg, context):
    _remember(msg, context)
    metrics = MetricRecord({"num-examples": 7, "loss": 0.25, "hist": [1.0, 2.0]})
    extra = MetricRecord({"other": 3})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics, "more": extra}), reply_to=msg)


@echo.evaluate()
def echo_evaluate(msg, context):
    _remember(msg, context)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "accuracy": 0.5})}), reply_to=msg)


raising = ClientApp()


@raising.train()
def raising_train(msg, context):
    raise RuntimeError("the silo's GPU caught fire")


@raising.evaluate()
def raising_evaluate(msg, context):
    raise ValueError("validation split is empty")


no_count = ClientApp()


@no_count.train()
def no_count_train(msg, context):
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"loss": 1.0})}),
                   reply_to=msg)


@no_count.evaluate()
def no_count_evaluate(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": 1.0})}), reply_to=msg)


count_in_config = ClientApp()


@count_in_config.train()
def count_in_config_train(msg, context):
    content = RecordDict({"arrays": msg.content["arrays"], "config": ConfigRecord({"num-examples": 5})})
    return Message(content, reply_to=msg)


no_arrays = ClientApp()


@no_arrays.train()
def no_arrays_train(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)


other_name = ClientApp()


@other_name.train()
def other_name_train(msg, context):
    content = RecordDict({"weights": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 2})})
    return Message(content, reply_to=msg)


error_reply = ClientApp()


@error_reply.train()
def error_reply_train(msg, context):
    return Message(Error(code=0, reason="out of memory on node"), reply_to=msg)


not_a_message = ClientApp()


@not_a_message.train()
def not_a_message_train(msg, context):
    return {"arrays": msg.content["arrays"]}


train_only = ClientApp()


@train_only.train()
def train_only_train(msg, context):
    return echo_train(msg, context)


NOT_AN_APP = object()
'''


@pytest.fixture(scope="module")
def _probe_module(tmp_path_factory):
    """The probe module, importable as ``airfed_bridge_probe`` (as a job's ``module:attr``)."""
    root = tmp_path_factory.mktemp("probe")
    (root / "airfed_bridge_probe.py").write_text(textwrap.dedent(PROBE))
    sys.path.insert(0, str(root))
    try:
        load_object("airfed_bridge_probe:SEEN")
        yield sys.modules["airfed_bridge_probe"]
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("airfed_bridge_probe", None)


@pytest.fixture
def probe(_probe_module):
    """The probe module with an empty log of what its apps saw."""
    _probe_module.SEEN.clear()
    return _probe_module


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> dict[str, Path]:
    """Three silos' .npz files written by the example's own partitioner (IID, seeded)."""
    root = tmp_path_factory.mktemp("digits")
    silos = [{"name": n, "data": str(root / f"{n}.npz")} for n in ("us", "eu", "asia")]
    prepare(silos, {"partition": "iid", "seed": 3})
    return {s["name"]: Path(s["data"]) for s in silos}


def _silo(data: Path | str, name: str = "us", **extra) -> PlanSilo:
    return PlanSilo(name=name, data=str(data), node_config=extra)


def _plan(silo: PlanSilo, client_app: str = DIGITS_APP, r: int = 4, **training) -> Plan:
    return Plan(
        job="digits",
        round=r,
        dag_run_id="manual__1",
        created_at=0.0,
        spec_hash="0" * 64,
        client_app=client_app,
        strategy=Strategy(),
        registry=RegistryNames(model_name="digits-mlp", experiment="airfed/digits"),
        training=training or {"local-epochs": 1, "lr": 0.05, "batch-size": 32},
        silos=[silo],
        input_global=ObjectRef(key="digits/rounds/4/global.safetensors", sha256="0" * 64),
    )


# --- the example ClientApp ----------------------------------------------------------------------------------------


def test_train_returns_the_models_tensors_trained_on_the_silos_data(digits_data):
    state = initial_state()
    plan = _plan(_silo(digits_data["us"]))
    reply = run_client_app(plan, plan.silos[0], "train", state)
    assert isinstance(reply, Reply)
    assert reply.arrays is not None
    assert list(reply.arrays) == list(state)
    for name, tensor in state.items():
        assert reply.arrays[name].shape == tensor.shape and reply.arrays[name].dtype == tensor.dtype, name
    assert any(not torch.equal(reply.arrays[k], state[k]) for k in state)  # it trained
    x_train, _ = load_split(digits_data["us"], "train")
    assert reply.num_examples == reply.metrics["num-examples"] == len(x_train) > 0
    assert isinstance(reply.num_examples, int)
    assert 0 < reply.metrics["train_loss"] < 10
    assert all(torch.isfinite(t).all() for t in reply.arrays.values())


def test_train_does_not_modify_the_callers_state(digits_data):
    state = initial_state()
    before = {k: v.clone() for k, v in state.items()}
    plan = _plan(_silo(digits_data["eu"]))
    run_client_app(plan, plan.silos[0], "train", state)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_evaluate_returns_metrics_and_no_arrays(digits_data):
    plan = _plan(_silo(digits_data["asia"]))
    reply = run_client_app(plan, plan.silos[0], "evaluate", initial_state())
    assert reply.arrays is None
    _, y_val = load_split(digits_data["asia"], "val")
    assert reply.num_examples == len(y_val) > 0
    assert set(reply.metrics) == {"loss", "accuracy", "num-examples"}
    assert 0.0 <= reply.metrics["accuracy"] <= 1.0 and reply.metrics["loss"] > 0
    # an untrained 10-class model: chance accuracy, loss near ln(10)
    assert reply.metrics["loss"] == pytest.approx(np.log(10), rel=0.2)


def test_training_config_reaches_the_app(digits_data):
    """``lr: 0`` from the round's training config leaves the weights exactly as sent."""
    state = initial_state()
    silo = _silo(digits_data["us"])
    frozen = run_client_app(_plan(silo, **{"lr": 0.0, "local-epochs": 1}), silo, "train", state)
    assert all(torch.equal(frozen.arrays[k], state[k]) for k in state)
    moved = run_client_app(_plan(silo, **{"lr": 0.05, "local-epochs": 1}), silo, "train", state)
    assert any(not torch.equal(moved.arrays[k], state[k]) for k in state)


def test_the_same_round_and_config_train_the_same_weights(digits_data):
    """The example seeds from config 'seed' + 'server-round', so a retry reproduces its update."""
    silo = _silo(digits_data["eu"])
    a = run_client_app(_plan(silo, r=2), silo, "train", initial_state())
    b = run_client_app(_plan(silo, r=2), silo, "train", initial_state())
    c = run_client_app(_plan(silo, r=3), silo, "train", initial_state())
    assert all(torch.equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert any(not torch.equal(a.arrays[k], c.arrays[k]) for k in a.arrays)  # server-round reached the app


def test_a_wrong_data_path_surfaces_as_an_error_naming_the_file(tmp_path):
    silo = _silo(tmp_path / "nowhere.npz")
    with pytest.raises(Exception, match="nowhere.npz"):
        run_client_app(_plan(silo), silo, "train", initial_state())


# --- what reaches the app -----------------------------------------------------------------------------------------


def test_config_and_server_round_reach_the_app(probe):
    silo = _silo("/data/us.npz")
    plan = _plan(silo, client_app="airfed_bridge_probe:echo", r=5, **{"lr": 0.01, "local-epochs": 3, "tag": "x"})
    run_client_app(plan, silo, "train", {"w": torch.ones(2)})
    (seen,) = probe.SEEN
    assert seen["config"] == {"lr": 0.01, "local-epochs": 3, "tag": "x", "server-round": 5}
    assert seen["run_config"] == seen["config"]
    assert seen["message_type"] == "train" and seen["group_id"] == "5" and seen["run_id"] == 5
    assert seen["array_keys"] == ["w"]


def test_node_config_carries_data_path_silo_name_and_extras(probe):
    silo = _silo("/data/eu.npz", name="eu", gpu=False, shard=2)
    plan = _plan(silo, client_app="airfed_bridge_probe:echo")
    run_client_app(plan, silo, "evaluate", {"w": torch.ones(2)})
    (seen,) = probe.SEEN
    assert seen["node_config"] == {"data-path": "/data/eu.npz", "silo": "eu", "gpu": False, "shard": 2}
    assert seen["node_config"] == node_config(silo)
    assert seen["message_type"] == "evaluate"
    assert seen["node_id"] == seen["dst_node_id"] == silo_node_id("eu")


def test_data_path_expands_airfed_home_and_env(probe, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFED_HOME", str(tmp_path))
    monkeypatch.setenv("SILO_ROOT", "/mnt/silo")
    assert node_config(_silo("${AIRFED_HOME}/data/us.npz"))["data-path"] == f"{tmp_path}/data/us.npz"
    assert node_config(_silo("$SILO_ROOT/us.npz"))["data-path"] == "/mnt/silo/us.npz"
    silo = _silo("${AIRFED_HOME}/d.npz")
    run_client_app(_plan(silo, client_app="airfed_bridge_probe:echo"), silo, "train", {"w": torch.ones(1)})
    assert probe.SEEN[0]["node_config"]["data-path"] == f"{tmp_path}/d.npz"


def test_a_silo_cannot_override_its_data_path_through_node_config():
    assert node_config(_silo("/real.npz", **{"data-path": "/elsewhere.npz"}))["data-path"] == "/real.npz"


def test_node_ids_are_stable_positive_and_distinct():
    names = [f"silo-{i}" for i in range(500)]
    ids = [silo_node_id(n) for n in names]
    assert ids == [silo_node_id(n) for n in names]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids)


def test_reply_metrics_are_the_numeric_values_of_every_metric_record(probe):
    app = load_client_app("airfed_bridge_probe:echo")
    reply = call_client_app(app, "train", {"w": torch.arange(3.0)}, {"server-round": 1}, silo=_silo("/d"),
                            round_number=1)
    assert reply.metrics == {"num-examples": 7, "loss": 0.25, "other": 3}  # the list-valued metric is dropped
    assert torch.equal(reply.arrays["w"], torch.arange(3.0))


def test_train_reply_arrays_may_have_another_record_name(probe):
    app = load_client_app("airfed_bridge_probe:other_name")
    reply = call_client_app(app, "train", {"w": torch.ones(4)}, {}, silo=_silo("/d"), round_number=1)
    assert torch.equal(reply.arrays["w"], torch.ones(4)) and reply.num_examples == 2


# --- refusals -----------------------------------------------------------------------------------------------------


def _call(app_attr: str, message_type: str = "train") -> Reply:
    app = load_client_app(f"airfed_bridge_probe:{app_attr}")
    return call_client_app(app, message_type, {"w": torch.ones(2)}, {"server-round": 1}, silo=_silo("/d"),
                           round_number=1)


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_a_reply_without_num_examples_is_refused(probe, message_type):
    with pytest.raises(ClientAppError, match=f"the {message_type} handler's reply has no 'num-examples' metric"):
        _call("no_count", message_type)


def test_num_examples_must_be_a_metric_not_a_config_value(probe):
    with pytest.raises(ClientAppError, match="no 'num-examples' metric"):
        _call("count_in_config")


def test_a_train_reply_without_arrays_is_refused(probe):
    with pytest.raises(ClientAppError, match="train handler's reply has no ArrayRecord"):
        _call("no_arrays")


def test_an_error_reply_is_refused_with_its_reason(probe):
    with pytest.raises(ClientAppError, match="train handler replied with an error: out of memory on node"):
        _call("error_reply")


def test_a_handler_returning_something_else_is_refused(probe):
    with pytest.raises(ClientAppError, match="train handler returned dict, not a flwr Message"):
        _call("not_a_message")


@pytest.mark.parametrize(
    ("message_type", "text"), [("train", "the silo's GPU caught fire"), ("evaluate", "validation split is empty")]
)
def test_a_raising_client_app_fails_with_its_own_message(probe, message_type, text):
    with pytest.raises(Exception, match=text):
        _call("raising", message_type)


def test_a_raising_client_app_is_a_client_app_error_naming_the_handler(probe):
    with pytest.raises(ClientAppError, match="train handler") as info:
        _call("raising")
    assert "the silo's GPU caught fire" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_missing_handler_is_an_error(probe):
    with pytest.raises(Exception, match="No evaluate function registered"):
        _call("train_only", "evaluate")


@pytest.mark.parametrize(
    ("ref", "text"),
    [
        ("airfed_no_such_module:app", "cannot import module 'airfed_no_such_module'"),
        ("airfed_bridge_probe:nope", "has no attribute 'nope'"),
        ("airfed_bridge_probe:NOT_AN_APP", "is a object, not a flwr.clientapp.ClientApp"),
        ("airfed_bridge_probe:SEEN", "is a list, not a flwr.clientapp.ClientApp"),
    ],
)
def test_a_bad_client_app_reference_is_a_client_app_error(probe, ref, text):
    with pytest.raises(ClientAppError, match=text):
        load_client_app(ref)


def test_the_example_app_loads_by_its_spec_reference():
    from flwr.clientapp import ClientApp

    assert isinstance(load_client_app(DIGITS_APP), ClientApp)
