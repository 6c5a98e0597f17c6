"""``python -m fl_tasks <step> --job J --round R --run-id ID [--silo S]``: one step of one round.

distribute also takes ``--chain-id`` (the first DAG run of a chain of rounds: one MLflow parent
run per chain) and ``--training`` (the trigger form's training config).

The same argv runs in a Kubernetes pod and in the local runner's subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys

from fl_tasks.contract import REGION_STEPS, SKIP_EXIT_CODE, STEPS, TIMEOUT_ENV
from fl_tasks.steps.common import NotSampled, StepArgs, StepEnv, log


class StepTimeout(TimeoutError):
    """The step ran longer than its limit (``AIRFED_STEP_TIMEOUT``)."""


def _arm_timeout() -> None:
    seconds = int(os.environ.get(TIMEOUT_ENV) or 0)
    if seconds <= 0:
        return

    def expire(_signum: int, _frame: object) -> None:
        raise StepTimeout(f"timed out after {seconds}s (execution.silo/server_timeout_seconds)")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fl_tasks", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--job", required=True)
    parser.add_argument("--round", default=None, help="round number ('next' for distribute)")
    parser.add_argument("--run-id", default="manual", help="the Airflow DAG run id")
    parser.add_argument("--silo", default=None)
    parser.add_argument("--region", default=None, help="the region (regional-tier steps)")
    parser.add_argument("--chain-id", default=None,
                        help="the first DAG run of this chain of rounds (distribute; default: --run-id)")
    parser.add_argument("--training", default=None, help="JSON object overriding the training config")
    parser.add_argument("--decision", default=None, help="JSON object: a person's answer to a candidate (promote)")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    round_number = None if ns.round in (None, "next") else int(ns.round)
    training = json.loads(ns.training) if ns.training else None
    if training is not None and not isinstance(training, dict):
        raise SystemExit(f"--training must be a JSON object, got {ns.training!r}")
    decision = json.loads(ns.decision) if ns.decision else None
    args = StepArgs(ns.step, ns.job, round_number, ns.run_id, ns.silo, chain_id=ns.chain_id, training=training,
                    region=ns.region, decision=decision)
    if ns.step in ("train", "validate", "evaluate") and not ns.silo:
        raise SystemExit(f"step {ns.step} needs --silo")
    if ns.step in REGION_STEPS and not ns.region:
        raise SystemExit(f"step {ns.step} needs --region")
    module = importlib.import_module(f"fl_tasks.steps.{ns.step}")
    env = StepEnv(args)
    _arm_timeout()
    try:
        module.run(env)
    except NotSampled as exc:
        log(str(exc))
        return SKIP_EXIT_CODE
    except BaseException as exc:
        signal.alarm(0)
        recorder = getattr(module, "record_failure", None)
        if recorder is not None and not isinstance(exc, KeyboardInterrupt):
            try:
                recorder(env, exc)
            except Exception as record_exc:  # noqa: BLE001 - never mask the step's own error
                log(f"could not record the failure in the store: {record_exc}")
        raise
    finally:
        signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
