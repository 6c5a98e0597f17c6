"""Batch prediction with the job's `champion` model, as a downstream consumer of the model Asset."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from safetensors.torch import load_file

from examples.digits.model import DigitsMLP


def predict_with_champion(model_name: str = "digits-mlp", out_dir: str | None = None) -> dict:
    """Score sklearn's digits with the champion global model; write predictions as CSV."""
    from sklearn.datasets import load_digits

    client = MlflowClient()
    version = client.get_model_version_by_alias(model_name, "champion")
    model_dir = Path(download_artifacts(artifact_uri=version.source))
    model = DigitsMLP()
    model.load_state_dict(load_file(str(model_dir / "global.safetensors")))
    model.eval()

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32))
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    accuracy = float((predicted == digits.target).mean())

    home = Path(os.environ.get("AIRFED_HOME", "~/.airfed")).expanduser()
    out = Path(out_dir or home / "predictions" / model_name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"v{version.version}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "predicted", "label"])
        writer.writerows(zip(range(len(predicted)), predicted.tolist(), digits.target.tolist(), strict=True))
    print(f"{model_name} v{version.version} (champion): accuracy {accuracy:.4f} on {len(predicted)} images -> {path}")
    return {"model_version": int(version.version), "accuracy": accuracy, "predictions": str(path)}
