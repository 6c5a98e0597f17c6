"""Silo data: load a silo's ``.npz`` (our layout or MedMNIST's) and split digits across silos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: MedMNIST's key names; our partitioner writes the same layout so one loader reads both.
SPLITS = {"train": ("train_images", "train_labels"), "val": ("val_images", "val_labels")}


def load_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split: x float32 in [0, 1] with shape (n, pixels), y int64."""
    with np.load(path) as data:
        x_key, y_key = SPLITS[split]
        if x_key not in data:  # also accept x_train / y_train style files
            x_key, y_key = f"x_{split}", f"y_{split}"
        x, y = data[x_key], data[y_key]
    x = x.astype(np.float32)
    if x.max(initial=0) > 1.0:
        x /= 255.0 if x.max() > 16 else 16.0
    return x.reshape(len(x), -1), y.reshape(-1).astype(np.int64)


def partition_indices(labels: np.ndarray, n_silos: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """IID or Dirichlet(alpha) label-skewed split of sample indices across ``n_silos``."""
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), n_silos)]
    if scheme != "dirichlet":
        raise ValueError(f"data.options.partition must be 'iid' or 'dirichlet', got {scheme!r}")
    parts: list[list[int]] = [[] for _ in range(n_silos)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet([alpha] * n_silos)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for silo, chunk in enumerate(np.split(idx, cuts)):
            parts[silo].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def prepare(silos: list[dict], options: dict) -> None:
    """Write one ``.npz`` per silo (train/val) from sklearn's digits. Called by ``airfed run``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    seed = int(options.get("seed", 0))
    parts = partition_indices(
        y, len(silos), str(options.get("partition", "iid")), float(options.get("alpha", 0.5)), seed
    )
    val_fraction = float(options.get("val_fraction", 0.2))
    rng = np.random.default_rng(seed + 1)
    for silo, idx in zip(silos, parts, strict=True):
        idx = rng.permutation(idx)
        n_val = max(1, int(len(idx) * val_fraction))
        val, train = idx[:n_val], idx[n_val:]
        path = Path(silo["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, train_images=x[train], train_labels=y[train], val_images=x[val], val_labels=y[val])
        classes = np.bincount(y[idx], minlength=10).tolist()
        print(f"[airfed] wrote {path}: {len(train)} train / {len(val)} val, examples per class {classes}")
