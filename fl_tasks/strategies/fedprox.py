"""FedProx: FedAvg on the server; the clients add the proximal term."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedProx [Li et al., 2018].

    Parameters
    ----------
    proximal_mu : float (default: 0.0)
        Weight of the proximal term. Sent to the clients in their train config (``proximal_mu``);
        the server aggregates like FedAvg. 0 makes FedProx FedAvg.
    """

    name = "FedProx"
    client_params = ("proximal_mu",)

    proximal_mu: float = Field(0.0, ge=0.0)
