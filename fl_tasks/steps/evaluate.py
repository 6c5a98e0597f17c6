"""evaluate: federated evaluation of the round's new global model on one silo's validation data."""

from __future__ import annotations

from fl_tasks.bridge import run_client_app
from fl_tasks.records import Evaluation, Head, Result
from fl_tasks.steps.common import StepEnv, log, scratch_dir, write_result
from fl_tasks.weights import load_state_dict


def run(env: StepEnv) -> None:
    plan = env.plan()
    silo = env.silo_entry(plan)
    r, name = env.round, silo.name
    # the result's sha256 is recorded in HEAD while HEAD points at this round (the run's own evaluate)
    head = env.store.get_record_or_none(env.keys.head, Head)
    result = env.store.get_record(env.keys.result(r), Result, head.result_sha256 if head and head.round == r else None)
    if result.new_global is None:
        raise RuntimeError(f"round {r} was not committed: {result.reason}")
    new_global = result.new_global
    with scratch_dir() as tmp:
        reply = run_client_app(plan, silo, "evaluate", load_state_dict(env.fetch(new_global, tmp)))
    record = Evaluation(
        job=env.args.job,
        round=r,
        silo=name,
        global_sha256=new_global.sha256,
        num_examples=reply.num_examples,
        metrics=reply.metrics,
    )
    env.store.put_record(env.keys.evaluation(r, name), record)
    log(f"round {r}: silo {name} evaluated global {new_global.sha256[:12]}: {reply.metrics}")
    write_result({"round": r, "silo": name, "metrics": reply.metrics})
