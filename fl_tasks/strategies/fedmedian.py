"""FedMedian: the elementwise median of the updates."""

from __future__ import annotations

from fl_tasks.strategies.fedavg import FedAvg


class FedMedian(FedAvg):
    """Federated Median [Yin et al., 2018]. No parameters; the example counts are ignored."""

    name = "FedMedian"
    weighted = False
