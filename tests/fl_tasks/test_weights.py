"""Weight files are byte-for-byte reproducible across processes (safetensors' metadata order is not)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from fl_tasks.weights import read_metadata, save_state_dict

WRITE = """
import sys, torch
from fl_tasks.weights import save_state_dict
g = torch.Generator().manual_seed(0)
state = {"fc1.weight": torch.randn(16, 8, generator=g), "fc1.bias": torch.zeros(16), "n": torch.arange(3)}
save_state_dict(state, sys.argv[1], metadata={"job": "digits", "round": "3", "silo": "eu", "z": "1", "a": "2"})
"""


def test_two_processes_write_identical_bytes(tmp_path: Path) -> None:
    outs = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    # each process gets its own hash seed, as separate pods would (run side by side: only their start-up costs)
    procs = [subprocess.Popen([sys.executable, "-c", WRITE, str(out)]) for out in outs]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    shas = {hashlib.sha256(out.read_bytes()).hexdigest() for out in outs}
    assert len(shas) == 1
    assert read_metadata(tmp_path / "w0.safetensors") == {"job": "digits", "round": "3", "silo": "eu", "z": "1",
                                                          "a": "2"}


def test_without_metadata(tmp_path: Path) -> None:
    import torch

    save_state_dict({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    assert read_metadata(tmp_path / "a.safetensors") == {}
