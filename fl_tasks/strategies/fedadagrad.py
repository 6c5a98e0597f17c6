"""FedAdagrad."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class FedAdagrad(FedAvg):
    """FedAdagrad [Reddi et al., 2020].

    Parameters
    ----------
    eta : float (default: 0.1)
        Server-side learning rate.
    eta_l : float (default: 0.1)
        Client-side learning rate (unused by the server, as in Flower).
    tau : float (default: 1e-3)
        Controls the algorithm's degree of adaptability.
    """

    name = "FedAdagrad"

    eta: float = Field(0.1, gt=0.0)
    eta_l: float = Field(0.1, gt=0.0)
    tau: float = Field(1e-3, gt=0.0)
