"""What every strategy's parameter model shares. Pure (pydantic only)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class StrategyParams(BaseModel):
    """The server-side parameters of one Flower strategy (``flwr.serverapp.strategy``), by Flower's names.

    Only what decides the aggregation is a parameter here: sampling (``fraction_train``) and the
    quorum are the spec's ``strategy.fraction_train`` / ``quorum``, and record keys are fixed by
    the store layout. Subclasses document each parameter once, with its default, in their docstring.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Flower's class name
    name: ClassVar[str]
    #: the aggregate depends on each update's ``num-examples`` (FedAvg family, MultiKrum)
    weighted: ClassVar[bool] = True
    #: parameters the clients apply: distribute puts them into the round's train config
    client_params: ClassVar[tuple[str, ...]] = ()
    #: legacy parameter name (Flower's ``flwr.server.strategy``) -> current name
    legacy_names: ClassVar[dict[str, str]] = {}

    def check_silo_count(self, n_silos: int) -> None:
        """Raise ValueError if a round over ``n_silos`` updates can never aggregate."""
