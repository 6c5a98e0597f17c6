"""MultiKrum: the example-weighted mean of the updates with the lowest Krum scores."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class MultiKrum(FedAvg):
    """MultiKrum [Blanchard et al., 2017].

    Parameters
    ----------
    num_malicious_nodes : int (default: 0)
        Number of malicious nodes assumed: an update's score sums its squared distances to its
        ``n - num_malicious_nodes - 2`` closest others.
    num_nodes_to_select : int (default: 1)
        Number of lowest-scoring updates averaged (weighted by ``num-examples``); 1 is Krum.
    """

    name = "MultiKrum"

    num_malicious_nodes: int = Field(0, ge=0)
    num_nodes_to_select: int = Field(1, ge=1)

    def check_silo_count(self, n_silos: int) -> None:
        if self.num_nodes_to_select > n_silos:
            raise ValueError(
                f"strategy.params.num_nodes_to_select={self.num_nodes_to_select} is more than the "
                f"{n_silos} silo(s) of the job"
            )
