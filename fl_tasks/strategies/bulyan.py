"""Bulyan: MultiKrum selection, then a per-element trimmed mean around the median."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class Bulyan(FedAvg):
    """Bulyan [El Mhamdi et al., 2018], with Flower's default selection rule (``select_multikrum``):
    the ``n - 2f`` updates with the lowest Krum scores, then per element the mean of the
    ``n - 4f`` values closest to their median. The example counts are ignored.

    Parameters
    ----------
    num_malicious_nodes : int (default: 0)
        Number of malicious nodes assumed (``f``); a round needs at least ``4f + 3`` updates.
    """

    name = "Bulyan"
    weighted = False
    legacy_names = {"num_malicious_clients": "num_malicious_nodes"}

    num_malicious_nodes: int = Field(0, ge=0)

    def check_silo_count(self, n_silos: int) -> None:
        need = 4 * self.num_malicious_nodes + 3
        if n_silos < need:
            raise ValueError(
                f"strategy.params.num_malicious_nodes={self.num_malicious_nodes}: Bulyan needs at least "
                f"4 * num_malicious_nodes + 3 = {need} silos, the job has {n_silos}"
            )
