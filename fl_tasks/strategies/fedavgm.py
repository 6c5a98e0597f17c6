"""FedAvgM: FedAvg with server-side momentum."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class FedAvgM(FedAvg):
    """Federated Averaging with server momentum [Hsu et al., 2019].

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Server-side learning rate.
    server_momentum : float (default: 0.0)
        Server-side momentum factor (0: no momentum; with learning rate 1 this is FedAvg).
    """

    name = "FedAvgM"

    server_learning_rate: float = Field(1.0, gt=0.0)
    server_momentum: float = Field(0.0, ge=0.0)
