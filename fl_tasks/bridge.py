"""The Flower bridge: call a user's ``ClientApp`` exactly as a Flower SuperNode would.

The train step sends a ``train`` Message whose content holds the global model (``ArrayRecord``
under "arrays") and the round config (``ConfigRecord`` under "config"); the silo's data location
arrives in the Context's node config ("data-path"). The reply's "arrays" and "metrics" are stored;
``num-examples`` weights the average, as in Flower's FedAvg. Evaluate works the same way.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fl_tasks.paths import expand_path
from fl_tasks.records import Plan, PlanSilo


class ClientAppError(RuntimeError):
    """The user's ClientApp failed or replied with something the protocol does not allow."""


@dataclass
class Reply:
    arrays: dict[str, torch.Tensor] | None
    metrics: dict[str, float | int]

    @property
    def num_examples(self) -> float | int | None:
        """Flower's ``num-examples`` metric, as the client reported it (the guards judge it)."""
        return self.metrics.get("num-examples")


def load_object(ref: str) -> Any:
    """Import ``module:attr`` (the current directory is importable, as for ``flwr run``)."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ClientAppError(f"cannot import module {module_name!r} of {ref!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ClientAppError(f"{module_name!r} has no attribute {attr!r} (from {ref!r})") from None
    return obj


def load_client_app(ref: str) -> ClientApp:
    app = load_object(ref)
    if not isinstance(app, ClientApp):
        raise ClientAppError(f"{ref!r} is a {type(app).__name__}, not a flwr.clientapp.ClientApp")
    return app


def node_config(silo: PlanSilo) -> dict[str, int | float | str | bool]:
    """The silo's Flower node config: its data location, name and any extra config from the spec."""
    return {**silo.node_config, "data-path": expand_path(silo.data), "silo": silo.name}


def silo_node_id(silo_name: str) -> int:
    """A stable positive node id per silo (Flower node ids are integers)."""
    return zlib.crc32(silo_name.encode()) or 1


def run_client_app(plan: Plan, silo: PlanSilo, message_type: str, state: dict[str, torch.Tensor]) -> Reply:
    """What a silo step does with the round's ClientApp: load it and send it one message with the
    round's config (:meth:`Plan.client_config`)."""
    app = load_client_app(plan.client_app)
    return call_client_app(app, message_type, state, plan.client_config(), silo=silo, round_number=plan.round)


def call_client_app(
    app: ClientApp,
    message_type: str,
    state: dict[str, torch.Tensor],
    config: Mapping[str, int | float | str | bool],
    *,
    silo: PlanSilo,
    round_number: int,
) -> Reply:
    """Send one train/evaluate Message to the ClientApp, as a SuperNode would, and unpack its reply."""
    node_id = silo_node_id(silo.name)
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(dict(config))})
    message = Message(content=content, dst_node_id=node_id, message_type=message_type, group_id=str(round_number))
    context = Context(
        run_id=round_number,
        node_id=node_id,
        node_config=node_config(silo),
        state=RecordDict(),
        run_config=dict(config),
    )
    try:
        reply = app(message, context)
    except TimeoutError:  # the step's own time limit (a SIGALRM inside the handler) stays a timeout
        raise
    except Exception as exc:  # as a SuperNode would: the user's code failed, named as such
        raise ClientAppError(f"the {message_type} handler raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(reply, Message):
        raise ClientAppError(f"the {message_type} handler returned {type(reply).__name__}, not a flwr Message")
    if reply.has_error():
        raise ClientAppError(f"the {message_type} handler replied with an error: {reply.error.reason}")
    arrays = None
    if message_type == "train":
        records = reply.content.array_records
        if not records:
            raise ClientAppError("the train handler's reply has no ArrayRecord (expected content['arrays'])")
        record = records.get("arrays") or next(iter(records.values()))
        arrays = record.to_torch_state_dict()
    metrics: dict[str, float | int] = {}
    for metric_record in reply.content.metric_records.values():
        metrics.update({k: v for k, v in metric_record.items() if isinstance(v, int | float)})
    if "num-examples" not in metrics:
        raise ClientAppError(f"the {message_type} handler's reply has no 'num-examples' metric")
    return Reply(arrays=arrays, metrics=metrics)
