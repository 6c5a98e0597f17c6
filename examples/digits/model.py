"""A small MLP for 8x8 digit images (any square grayscale image size works)."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_PIXELS = 64
NUM_CLASSES = 10


class DigitsMLP(nn.Module):
    def __init__(self, pixels: int = IMAGE_PIXELS, hidden: int = 128, classes: int = NUM_CLASSES):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def initial_state() -> dict[str, torch.Tensor]:
    """The round-1 global model (seeded, so every fresh job starts from the same weights)."""
    torch.manual_seed(0)
    return DigitsMLP().state_dict()
