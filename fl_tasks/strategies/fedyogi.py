"""FedYogi."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """FedYogi [Reddi et al., 2020]. Parameters as :class:`FedOpt`, with other defaults:
    ``eta`` 0.01, ``eta_l`` 0.0316, ``beta_1`` 0.9, ``beta_2`` 0.99."""

    name = "FedYogi"

    eta: float = Field(1e-2, gt=0.0)
    eta_l: float = Field(0.0316, gt=0.0)
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
