"""Batch prediction with the job's model, as a downstream consumer of the model Asset.

``predict_with_model`` takes the version the Asset event names and reads its weights from the store
(sha256 checked): no MLflow. ``predict_with_champion`` asks MLflow for the `champion` instead.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from examples.digits.model import DigitsMLP


def predict_with_model(model_name: str, version: int, key: str, sha256: str, out_dir: str | None = None) -> dict:
    """Score with version ``version``, whose global model is ``key`` in the store (checked against ``sha256``)."""
    from fl_tasks.store import open_store

    with tempfile.TemporaryDirectory(prefix="airfed-predict-") as tmp:
        path = Path(tmp) / "global.safetensors"
        open_store().get_file(key, path, sha256)
        return _score(model_name, int(version), path, out_dir)


def predict_with_champion(model_name: str = "digits-mlp", out_dir: str | None = None) -> dict:
    """Score sklearn's digits with the champion global model (asked of MLflow); write predictions as CSV."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient()
    version = client.get_model_version_by_alias(model_name, "champion")
    model_dir = Path(download_artifacts(artifact_uri=version.source))
    return _score(model_name, int(version.version), model_dir / "global.safetensors", out_dir)


def _score(model_name: str, version: int, weights: Path, out_dir: str | None) -> dict:
    """Score sklearn's digits with the model in ``weights``; write predictions as CSV."""
    from sklearn.datasets import load_digits

    model = DigitsMLP()
    model.load_state_dict(load_file(str(weights)))
    model.eval()

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32))
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    accuracy = float((predicted == digits.target).mean())

    home = Path(os.environ.get("AIRFED_HOME", "~/.airfed")).expanduser()
    out = Path(out_dir or home / "predictions" / model_name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"v{version}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "predicted", "label"])
        writer.writerows(zip(range(len(predicted)), predicted.tolist(), digits.target.tolist(), strict=True))
    print(f"{model_name} v{version}: accuracy {accuracy:.4f} on {len(predicted)} images -> {path}")
    return {"model_version": version, "accuracy": accuracy, "predictions": str(path)}
