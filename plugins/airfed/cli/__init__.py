"""The ``airfed`` command line.

Every command lives in a module with ``add_commands(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returns the exit code). Airflow is imported lazily:
``run``, ``render`` and ``up`` configure it first.
"""

from __future__ import annotations

import argparse
import sys

from airfed.spec import SpecError


def build_parser() -> argparse.ArgumentParser:
    from airfed.cli import offline, policies, promote, render, run, spec_commands, up

    parser = argparse.ArgumentParser(prog="airfed", description="Federated learning as Airflow DAGs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (run, spec_commands, render, up, offline, policies, promote):
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
