"""A job whose rounds are committed straight into a local store, then registered by the real step.

Shared by the tests of the register step's champion rules (test_lineage) and of promotion under
governance (test_promotion): records through :mod:`fl_tasks.records`, a real MLflow store.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fl_tasks.records import (
    AcceptedUpdate,
    Evaluation,
    Head,
    Manifest,
    ObjectRef,
    Plan,
    PlanSilo,
    RegistryNames,
    RegistrySummary,
    Result,
)
from fl_tasks.spec import Promotion, Strategy
from fl_tasks.steps import register
from fl_tasks.steps.common import StepArgs, StepEnv
from fl_tasks.store import JobKeys, open_store
from fl_tasks.weights import save_state_dict


class Job:
    """A job whose rounds are committed straight into a local store, then registered by the real step."""

    def __init__(self, root: Path, name: str, metric: str = "accuracy", direction: str = "maximize",
                 approval: str = "none"):
        self.name, self.root = name, root
        self.store = open_store(f"file://{root / 'store'}")
        self.store.prepare()
        self.keys = JobKeys(name)
        self.promotion = Promotion(metric=metric, direction=direction, approval=approval)
        self.model_name = f"{name}-model"
        self.dag_run_id = "scheduled__2025-01-01"
        self.head: Head | None = None

    def _put_model(self, key: str, fill: float) -> ObjectRef:
        path = self.root / "model.safetensors"
        save_state_dict({"w": torch.full((3,), fill)}, path)
        return ObjectRef(key=key, sha256=self.store.put_file(key, path))

    def commit(self, value: float) -> int:
        """Commit the next round with federated evaluation ``{metric: value}``; returns its number."""
        r = self.head.round + 1 if self.head else 1
        keys = self.keys
        input_global = self.head.global_ref if self.head else self._put_model(keys.global_model(1), 0.0)
        new_global = self._put_model(keys.global_model(r + 1), float(r))
        plan = Plan(
            job=self.name, round=r, dag_run_id=self.dag_run_id, created_at=1.0, spec_hash="f" * 64,
            client_app="examples.digits.client_app:app", strategy=Strategy(), promotion=self.promotion,
            registry=RegistryNames(model_name=self.model_name, experiment=f"airfed/{self.name}"),
            training={"lr": 0.05}, silos=[PlanSilo(name="us", data="/d/us.npz")], input_global=input_global,
            previous_head=self.head,
        )
        self.store.put_record(keys.plan(r), plan)
        update_sha = "a" * 64
        self.store.put_record(keys.manifest(r, "us"), Manifest(
            job=self.name, round=r, silo="us", dag_run_id=self.dag_run_id, key=keys.update(r, "us"),
            sha256=update_sha, num_examples=10, metrics={"train_loss": 0.5, "num-examples": 10},
            global_sha256=input_global.sha256,
        ))
        result_sha = self.store.put_record(keys.result(r), Result(
            job=self.name, round=r, dag_run_id=self.dag_run_id, accepted={"us": AcceptedUpdate(
                sha256=update_sha, num_examples=10)}, input_global=input_global, strategy=Strategy(),
            new_global=new_global, sampled=["us"], committed_at=2.0,
        ))
        self.store.put_record(keys.evaluation(r, "us"), Evaluation(
            job=self.name, round=r, silo="us", global_sha256=new_global.sha256, num_examples=10,
            metrics={self.promotion.metric: value, "num-examples": 10},
        ))
        self.head = Head(job=self.name, round=r, global_key=new_global.key, global_sha256=new_global.sha256,
                         result_key=keys.result(r), result_sha256=result_sha, dag_run_id=self.dag_run_id)
        self.store.put_record(keys.head, self.head)
        return r

    def register(self, r: int) -> RegistrySummary:
        register.run(StepEnv(StepArgs(step="register", job=self.name, round=r, run_id=self.dag_run_id),
                             store=self.store))
        return self.store.get_record(self.keys.registry(r), RegistrySummary)

    def round(self, value: float) -> RegistrySummary:
        return self.register(self.commit(value))
