"""FedTrimmedAvg: the elementwise mean after trimming both tails."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedavg import FedAvg


class FedTrimmedAvg(FedAvg):
    """Federated Averaging with Trimmed Mean [Yin et al., 2021]; the example counts are ignored.

    Parameters
    ----------
    beta : float (default: 0.2)
        Fraction cut off each tail of every element's distribution: ``int(beta * N)`` updates at
        each end. Must be in [0, 0.5): from 0.5 on, nothing is left to average (Flower's
        ``trim_mean`` fails, or returns NaN).
    """

    name = "FedTrimmedAvg"
    weighted = False

    beta: float = Field(0.2, ge=0.0, lt=0.5)
