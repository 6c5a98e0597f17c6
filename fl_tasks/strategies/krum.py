"""Krum: the single update with the lowest Krum score."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fl_tasks.strategies.multikrum import MultiKrum


class Krum(MultiKrum):
    """Krum [Blanchard et al., 2017]: MultiKrum selecting one update (returned as it is).

    Parameters
    ----------
    num_malicious_nodes : int (default: 0)
        Number of malicious nodes assumed (see :class:`MultiKrum`).
    """

    name = "Krum"
    weighted = False
    legacy_names = {"num_malicious_clients": "num_malicious_nodes"}

    num_nodes_to_select: Literal[1] = Field(1, exclude=True)
