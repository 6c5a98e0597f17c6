"""Flower's own strategies as reference implementations for the strategy tests (not a test module)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict


def serverapp_train(cls, results, **params):
    """Flower's current strategy class ``cls`` aggregating ``results`` as train replies."""
    replies = []
    for i, (arrays, num) in enumerate(results):
        content = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[np.array(a) for a in arrays]),
                              "metrics": MetricRecord({"num-examples": num})})
        replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=i + 1, message_type="train")))
    arrays, _metrics = cls(**params).aggregate_train(1, replies)
    return [a.numpy() for a in arrays.values()]
