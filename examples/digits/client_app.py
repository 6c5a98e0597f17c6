"""The digits ClientApp: an ordinary Flower app (it runs unchanged under ``flwr run``)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.digits.data import load_split
from examples.digits.model import DigitsMLP

app = ClientApp()


def _loader(context: Context, split: str, batch_size: int, shuffle: bool) -> DataLoader:
    x, y = load_split(context.node_config["data-path"], split)
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size, shuffle=shuffle)


def _model(msg: Message) -> DigitsMLP:
    model = DigitsMLP()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    torch.manual_seed(int(config.get("seed", 0)) + int(config.get("server-round", 0)))
    model = _model(msg)
    global_params = [p.detach().clone() for p in model.parameters()]
    loader = _loader(context, "train", int(config.get("batch-size", 32)), shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.05)), momentum=0.9)
    mu = float(config.get("proximal_mu", 0.0))  # FedProx's proximal term
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, seen = 0.0, 0
    for _epoch in range(int(config.get("local-epochs", 1))):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            if mu > 0:
                params = zip(model.parameters(), global_params, strict=True)
                loss = loss + mu / 2 * sum(((p - g) ** 2).sum() for p, g in params)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            seen += len(yb)
    metrics = MetricRecord({"train_loss": total / max(seen, 1), "num-examples": len(loader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = _model(msg)
    loader = _loader(context, "val", 256, shuffle=False)
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
            n += len(yb)
    metrics = MetricRecord({"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "num-examples": n})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
