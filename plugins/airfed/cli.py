"""The ``airfed`` command line. Airflow is imported lazily: ``airfed run`` configures it first."""

from __future__ import annotations

import argparse
import json
import sys

from airfed.spec_loader import SpecError, load_spec


def _cmd_validate(ns: argparse.Namespace) -> int:
    failed = False
    for path in ns.specs:
        try:
            load_spec(path)
        except SpecError as exc:
            failed = True
            for problem in exc.problems:
                print(problem)
        else:
            if not ns.quiet:
                print(f"{path}: ok", file=sys.stderr)
    return 1 if failed else 0


def _cmd_schema(ns: argparse.Namespace) -> int:
    from fl_tasks.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_run(ns: argparse.Namespace) -> int:
    from airfed.run import run_job

    training = json.loads(ns.training) if ns.training else None
    return run_job(ns.spec, ns.rounds, ns.json, training)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airfed", description="Federated learning as Airflow DAGs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one DAG run of a job on the embedded default (Airflow dag.test)")
    run.add_argument("spec")
    run.add_argument("--rounds", type=int, default=None, help="rounds in this run (default: rounds_per_run)")
    run.add_argument("--training", default=None, help="JSON object overriding the spec's training config")
    run.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check job specs; one 'file:line: field: message' per problem")
    validate.add_argument("specs", nargs="+")
    validate.add_argument("-q", "--quiet", action="store_true")
    validate.set_defaults(func=_cmd_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of a job spec")
    schema.set_defaults(func=_cmd_schema)

    from airfed import render

    render.add_commands(sub)
    from airfed import up as up_command

    up_command.add_commands(sub)
    from airfed.offline import add_commands as add_offline_commands

    add_offline_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
