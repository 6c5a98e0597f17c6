"""register: record the round's lineage in MLflow, register the global, move `champion` on improvement.

Reads everything from the store (plan, manifests, verdicts, result, evaluations), so it can be
re-run at any time; tag lookups make a re-run reuse the runs and version it created before.
Writes ``registry.json`` with the round's summary (what `airfed run` prints).

First, every earlier committed round that has no registry version (its register failed while MLflow
was unreachable) is registered, in round order (:mod:`fl_tasks.registry_sync`): the registry
converges to the store.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from fl_tasks import commit, lineage, registry_sync, report
from fl_tasks import promotion as promotion_history
from fl_tasks.contract import approval_dag_id, approval_run_id
from fl_tasks.paths import redact_uri
from fl_tasks.records import ApprovalRecord, Evaluation, Head, Manifest, Plan, RegistrySummary, Result, Verdict
from fl_tasks.steps.common import StepEnv, log, now, scratch_dir, write_result


def weighted(records: Sequence[Manifest | Evaluation]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric the records share (Flower's convention)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        w = float(rec.num_examples or rec.metrics.get("num-examples", 0))
        for key, value in rec.metrics.items():
            if key == "num-examples" or isinstance(value, bool):
                continue
            totals[key] = totals.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


def _publish_plot(env: StepEnv, r: int, summary: RegistrySummary) -> None:
    """Convergence plot up to this round: to the store (``reports/``) and to the MLflow runs."""
    with scratch_dir() as tmp:
        path = report.convergence_plot(report.history(env.store, env.keys, r), env.args.job, tmp / "convergence.png")
        env.store.put_file(env.keys.convergence_plot, path)
        with lineage.reporting_failures(f"logging the convergence plot of round {r}"):
            c = lineage.client()
            for run_id in (summary.mlflow_run_id, summary.mlflow_parent_run_id):
                c.log_artifact(run_id, str(path), artifact_path="plots")


def parent_run_key(plan: Plan) -> str:
    """The MLflow parent run of a round: one per chain of rounds (plans before chains: per DAG run)."""
    return plan.chain_id or plan.dag_run_id


class RoundNotCommitted(RuntimeError):
    pass


def record_uncommitted(env: StepEnv, plan: Plan, result: Result | None) -> None:
    """A round that did not commit still gets an MLflow round run (status FAILED) saying why."""
    r, job = env.round, env.args.job
    reason = (result.reason if result else None) or "aggregate did not commit this round (see its task log)"
    if result is None and plan.dag_run_id == env.args.run_id:
        # aggregate failed for good before writing anything (e.g. the store was unreachable): give the
        # round up, so the next run takes the claim over instead of waiting out its lease
        commit.record_uncommitted(env.store, env.keys, Result(
            job=job, round=r, dag_run_id=plan.dag_run_id, committed=False,
            reason=f"{reason}; run {plan.dag_run_id} gave the round up", input_global=plan.input_global,
        ))
    with lineage.reporting_failures(f"recording uncommitted round {r} of {job}"):
        _record_uncommitted(env, plan, result, reason)
    raise RoundNotCommitted(f"round {r} was not committed: {reason}")


def _record_uncommitted(env: StepEnv, plan: Plan, result: Result | None, reason: str) -> None:
    r, job = env.round, env.args.job
    c = lineage.client()
    exp_id = lineage.ensure_experiment(c, plan.registry.experiment)
    parent = lineage.ensure_parent_run(c, exp_id, job, parent_run_key(plan))
    run = lineage.ensure_round_run(c, exp_id, job, plan.dag_run_id, r, parent.info.run_id)
    rejected = result.rejected if result else {}
    tags = {f"rejected.{n}": why[:4000] for n, why in rejected.items()}
    tags["airfed.failure"] = reason[:4000]
    metrics: dict[str, float] = {
        "accepted": len(result.accepted) if result else 0, "rejected": len(rejected), "committed": 0,
    }
    region_metrics, region_tags = lineage.region_lineage(result.regions if result else None)
    metrics.update(region_metrics)
    tags.update(region_tags)
    lineage.log_round(c, run.info.run_id, metrics, {"round": r, "spec_hash": plan.spec_hash}, tags, step=r)
    c.set_terminated(run.info.run_id, "FAILED")
    c.set_terminated(parent.info.run_id, "FAILED")


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k != "num-examples" and not isinstance(v, bool)}


def _hold_for_approval(env: StepEnv, plan: Plan, c: MlflowClient, model_name: str, version: int) -> bool:
    """An improving version under ``promotion.approval: required``: tagged and recorded as pending
    (once: a re-run of register keeps a decision already taken). True while it awaits a person."""
    r = env.round
    answered = env.store.get_record_or_none(env.keys.approval(r), ApprovalRecord)
    if answered is not None and answered.version == version:
        return answered.state == "pending"
    promotion_history.request_approval(c, env.store, ApprovalRecord(
        job=plan.job, round=r, version=version, dag_run_id=plan.dag_run_id, state="pending",
        approval_dag_id=approval_dag_id(plan.job), approval_run_id=approval_run_id(r, plan.dag_run_id),
        requested_at=now(),
    ), model_name)
    log(f"round {r}: v{version} improves on the champion; it awaits approval in {approval_dag_id(plan.job)}")
    return True


def _champion_summary(env: StepEnv, current: ModelVersion | None, version: int) -> dict | None:
    """What the champion (before this round) scored, from its round's record: the approval task's
    comparison. None when there is no other champion."""
    if current is None or int(current.version) == version:
        return None
    r = current.tags.get("round")
    record = env.store.get_record_or_none(env.keys.registry(int(r)), RegistrySummary) if r and r.isdigit() else None
    base = {"version": int(current.version), "round": int(r) if r and r.isdigit() else None}
    if record is None:
        return base
    return {**base, **record.model_dump(mode="json", include={
        "metrics", "silo_metrics", "accepted", "rejected", "promotion_value", "mlflow_run_id", "mlflow_experiment_id",
    })}


def run(env: StepEnv, late: bool = False) -> None:
    """Register the round; first (unless ``late``: this is such a backfill) every earlier committed
    round without a version. A ``late`` round whose committing run stopped before its federated
    evaluation is registered without a promotion value and never becomes champion."""
    plan = env.plan()
    r, job = env.round, env.args.job
    if not late:
        with lineage.reporting_failures(f"registering the committed rounds before round {r} that have no version"):
            registry_sync.backfill(env.store, env.keys, upto=r - 1, log=log)
    head = env.store.get_record_or_none(env.keys.head, Head)
    # HEAD records the sha256 of the round it points at: that round's result is checked against it
    result = (env.store.get_record(env.keys.result(r), Result, head.result_sha256) if head and head.round == r
              else env.store.get_record_or_none(env.keys.result(r), Result))
    if head is None or head.round < r or result is None or not result.committed or result.new_global is None:
        record_uncommitted(env, plan, result)
        return
    new_global = result.new_global
    manifests = {n: env.store.get_record(env.keys.manifest(r, n), Manifest) for n in result.accepted}
    verdicts = {s.name: env.store.get_record_or_none(env.keys.verdict(r, s.name), Verdict) for s in plan.silos}
    evaluations = [
        e for s in plan.silos if (e := env.store.get_record_or_none(env.keys.evaluation(r, s.name), Evaluation))
    ]
    train_metrics = weighted(list(manifests.values()))
    eval_metrics = weighted(evaluations)
    promotion = plan.promotion
    if promotion.metric not in eval_metrics and not (late and not evaluations):
        raise RuntimeError(
            f"promotion metric {promotion.metric!r} is not among the federated evaluation metrics "
            f"{sorted(eval_metrics)}; set promotion.metric in the spec to one the ClientApp reports"
        )
    value = eval_metrics.get(promotion.metric)
    if value is None:
        log(f"round {r}: no federated evaluation was recorded (its run stopped before evaluate); registering it "
            f"without {promotion.metric}, so it cannot become champion")

    with lineage.reporting_failures(f"registering round {r} of {job}"):
        c = lineage.client()
        exp_id = lineage.ensure_experiment(c, plan.registry.experiment)
        parent = lineage.ensure_parent_run(c, exp_id, job, parent_run_key(plan))
        round_run = lineage.ensure_round_run(c, exp_id, job, plan.dag_run_id, r, parent.info.run_id)
        run_id = round_run.info.run_id

        metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in train_metrics.items()}
        metrics.update(eval_metrics)
        metrics.update(accepted=len(result.accepted), rejected=len(result.rejected), committed=1)
        for name, man in manifests.items():
            if man.num_examples is not None:
                metrics[f"{name}.num_examples"] = man.num_examples
            metrics.update({f"{name}.{k}": v for k, v in man.metrics.items() if k != "num-examples"})
        for name, verdict in verdicts.items():
            if verdict:
                metrics.update({f"{name}.update_{k}": v for k, v in verdict.metrics.items() if k != "num-examples"})
        for ev in evaluations:
            metrics.update({f"{ev.silo}.eval_{k}": v for k, v in ev.metrics.items() if k != "num-examples"})
        store_url = env.store.url
        params = {
            "round": r,
            "strategy": plan.strategy.name,
            "strategy_params": plan.strategy.params,
            "training": plan.training,
            "differential_privacy": plan.differential_privacy.model_dump() if plan.differential_privacy else None,
            "quorum": plan.quorum.model_dump(),
            "spec_hash": plan.spec_hash,
            "silos": ",".join(s.name for s in plan.silos),
            "store_url": store_url,
            "input_global_key": plan.input_global.key,
            "input_global_sha256": plan.input_global.sha256,
            "new_global_key": new_global.key,
            "new_global_sha256": new_global.sha256,
        }
        # the checksums the aggregator verified (result.json), not what a silo's manifest says now
        tags = {f"update_sha256.{n}": a.sha256 for n, a in result.accepted.items()}
        tags.update({f"update_key.{n}": env.keys.update(r, n) for n in result.accepted})
        tags.update({f"rejected.{n}": reason[:4000] for n, reason in result.rejected.items()})
        tags.update({"plan_key": env.keys.plan(r), "result_key": env.keys.result(r)})
        region_metrics, region_tags = lineage.region_lineage(result.regions)  # jobs with regions
        metrics.update(region_metrics)
        tags.update(region_tags)
        lineage.log_round(c, run_id, metrics, params, tags, step=r)
        lineage.log_round(c, parent.info.run_id, {k: metrics[k] for k in (*eval_metrics, "accepted", "rejected")},
                          {}, {"airfed.spec_hash": plan.spec_hash}, step=r)

        model_name = plan.registry.model_name
        lineage.ensure_registered_model(c, model_name, job)
        version = lineage.find_version(c, model_name, job, r, plan.dag_run_id, new_global.sha256)
        if version is None:
            with scratch_dir() as tmp:
                model_file = env.fetch(new_global, tmp)
                target = model_file.with_name("global.safetensors")
                model_file.rename(target)
                version = lineage.register_version(
                    c, model_name, run_id, target,
                    tags={
                        "job": job, "round": str(r), "dag_run_id": plan.dag_run_id, "spec_hash": plan.spec_hash,
                        "global_sha256": new_global.sha256, "store_key": new_global.key,
                        "store_url": store_url, "promotion_metric": promotion.metric,
                        **({"promotion_value": repr(value)} if value is not None else {"evaluated": "false"}),
                        **{f"update_sha256.{n}": a.sha256 for n, a in result.accepted.items()},
                    },
                    description=f"{job} round {r}: {plan.strategy.name} over {', '.join(manifests)}",
                )
            version = lineage.first_version(c, model_name, job, r, plan.dag_run_id, new_global.sha256, version)
        current = lineage.champion(c, model_name)
        current_value = None
        if current is not None and current.version != version.version:
            current_value = float(current.tags.get("promotion_value", "nan"))
        promoted = value is not None and (current is None or current.version == version.version or lineage.is_better(
            value, current_value, promotion.direction
        ))
        moves = current is None or current.version != version.version
        awaiting = False
        if promoted and moves and promotion.approval == "required":  # a candidate: a person decides
            promoted = False
            awaiting = _hold_for_approval(env, plan, c, model_name, int(version.version))
        elif promoted:
            c.set_registered_model_alias(model_name, lineage.CHAMPION, version.version)
            if moves:
                promotion_history.note_improvement(c, env.store, job, model_name, version,
                                                   int(current.version) if current else None)
        champion_version = int(version.version) if promoted else (int(current.version) if current else None)
        c.set_terminated(run_id, "FINISHED")
        c.set_terminated(parent.info.run_id, "FINISHED")

    summary = RegistrySummary(
        job=job,
        round=r,
        dag_run_id=plan.dag_run_id,
        accepted=sorted(result.accepted),
        rejected=result.rejected,
        train_loss=train_metrics.get("train_loss"),
        metrics=eval_metrics,
        promotion_metric=promotion.metric,
        promotion_value=value,
        registry_model=model_name,
        registry_version=int(version.version),
        champion_version=champion_version,
        promoted=promoted and (current is None or current.version != version.version),
        awaiting_approval=awaiting,
        silo_metrics={ev.silo: _numbers(ev.metrics) for ev in evaluations},
        mlflow_experiment_id=exp_id,
        mlflow_run_id=run_id,
        mlflow_parent_run_id=parent.info.run_id,
        tracking_uri=redact_uri(lineage.tracking_uri()),
        started_at=plan.created_at,
        finished_at=now(),
    )
    env.store.put_record(env.keys.registry(r), summary)
    _publish_plot(env, r, summary)
    log(
        f"round {r}: registered {model_name} v{version.version} ({promotion.metric}="
        f"{'not evaluated' if value is None else format(value, '.4f')}); champion is v{champion_version}"
    )
    write_result({**summary.model_dump(mode="json", exclude={"schema_version"}),
                  "champion": _champion_summary(env, current, int(version.version)),
                  "global": new_global.model_dump()})
