"""``airfed validate SPEC...`` and ``airfed schema``: check job specs, print their JSON Schema."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from airfed.spec import SpecError, load_spec


def validate(ns: argparse.Namespace) -> int:
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


def schema(ns: argparse.Namespace) -> int:
    from fl_tasks.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("validate", help="check job specs; one 'file:line: field: message' per problem")
    parser.add_argument("specs", nargs="+")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.set_defaults(func=validate)

    parser = subparsers.add_parser("schema", help="print the JSON Schema of a job spec")
    parser.set_defaults(func=schema)
