"""FedAvg: the example-weighted mean of the updates."""

from __future__ import annotations

from fl_tasks.strategies.base import StrategyParams


class FedAvg(StrategyParams):
    """Federated Averaging [McMahan et al., 2017]. No parameters."""

    name = "FedAvg"
