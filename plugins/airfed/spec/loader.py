"""Read a job spec file: ``yaml.safe_load`` + pydantic, with errors as ``file:line: field.path: message``.

YAML is composed into a node tree once (safe: no object construction); the data is constructed
from that tree, whose marks map pydantic's error locations back to line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fl_tasks.spec import JobSpec

SPEC_SUFFIXES = (".yaml", ".yml")
#: libyaml's parser when PyYAML has it (parsing dominates the DAG folder's load time), with the
#: safe constructor either way: plain data only, no object construction from tags.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: pydantic names each member of a union in an error's location; report the field once instead.
SCALAR_UNION_MEMBERS = {"int", "float", "bool", "str"}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line or 1}: {self.field or '<spec>'}: {self.message}"


class SpecError(ValueError):
    """A spec failed to load; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the deepest node that ``loc`` reaches; a missing key maps to its parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            key_node = next(k for k, v in node.value if v is match)
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _duplicate_keys(node: yaml.Node | None, path: str = "") -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                found.append((f"{path}.{name}".lstrip("."), key.start_mark.line + 1))
            seen.add(name)
            found += _duplicate_keys(value, f"{path}.{name}")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{path}[{i}]")
    return found


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def parse_spec_text(text: str, file: str) -> JobSpec:
    """Validate spec text; raise :class:`SpecError` naming file, line and field of every problem."""
    loader = SAFE_LOADER(text)
    try:
        root = loader.get_single_node()  # parsed once: the data and the lines of its fields
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError([Problem(file, line, "<yaml>", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(file, None, "<yaml>", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SpecError([Problem(file, 1, "<spec>", "a job spec must be a YAML mapping")])

    problems = [Problem(file, line, path, "duplicate key") for path, line in _duplicate_keys(root)]
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        seen: set[tuple[str, str]] = set()
        for err in exc.errors():
            loc = tuple(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if loc and loc[-1] in SCALAR_UNION_MEMBERS:  # one problem, not one per member of the union
                loc = loc[:-1]
                message = f"must be a number, boolean or string, got {err['input']!r}"
            elif err["type"] == "extra_forbidden":
                message = "unknown field"
            elif err["type"] == "missing":
                message = "required field is missing"
            path = _field_path(loc)
            if (path, message) in seen:
                continue
            seen.add((path, message))
            problems.append(Problem(file, _line_of(root, loc), path, message))
        raise SpecError(problems) from None
    if problems:
        raise SpecError(problems)
    return spec


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([Problem(str(path), None, "<file>", f"cannot read spec: {exc.strerror}")]) from None
    return parse_spec_text(text, str(path))


def find_specs(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix in SPEC_SUFFIXES and p.is_file())
