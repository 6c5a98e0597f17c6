"""FedAdam."""

from __future__ import annotations

from pydantic import Field

from fl_tasks.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """FedAdam [Reddi et al., 2020]. Parameters as :class:`FedOpt`, with other defaults:
    ``beta_1`` 0.9, ``beta_2`` 0.99."""

    name = "FedAdam"

    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
