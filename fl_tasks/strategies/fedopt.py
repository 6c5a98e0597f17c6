"""FedOpt: the adaptive server optimisers' shared parameters (FedAdagrad, FedAdam, FedYogi)."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class FedOpt(FedAvg):
    """Adaptive Federated Optimization [Reddi et al., 2020]; not a strategy a spec names itself.

    Parameters
    ----------
    eta : float (default: 0.1)
        Server-side learning rate.
    eta_l : float (default: 0.1)
        Client-side learning rate. Accepted for compatibility and never used, as in Flower: the
        clients take their learning rate from the train config.
    beta_1 : float (default: 0.0)
        Momentum parameter.
    beta_2 : float (default: 0.0)
        Second moment parameter.
    tau : float (default: 1e-3)
        Controls the algorithm's degree of adaptability.
    """

    eta: float = Field(0.1, gt=0.0)
    eta_l: float = Field(0.1, gt=0.0)
    beta_1: float = Field(0.0, ge=0.0, lt=1.0)
    beta_2: float = Field(0.0, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)
