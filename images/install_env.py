"""Install one side of an airfed deployment into a Python environment: the images and the rehearsal alike.

The two halves of airfed are installed apart in production (``DESIGN.md``, "Two environments"): the
Airflow image holds Airflow, the cncf-kubernetes provider and airfed's Airflow side; the fl-task image
holds what ``python -m fl_tasks <step>`` needs (torch, flwr, the MLflow client, ...). Each side's
dependencies are declared once, as an extra in ``pyproject.toml`` (``airfed[airflow]``,
``airfed[steps]``), and pinned by ``constraints.txt``. Both Dockerfiles and ``images/rehearse.py`` call
this script, so an image and its rehearsal cannot drift apart.

    python images/install_env.py install SIDE [--venv DIR | --python PY] [--deps-only | --project-only]
                                              [--torch-index-url URL] [--no-cache-dir]
    python images/install_env.py check SIDE [--python PY]
    python images/install_env.py requirements SIDE
    python images/install_env.py example-data SPEC.yaml [--python PY]

``install`` runs two phases, which a Dockerfile puts in two layers (dependencies change rarely,
sources often): *deps*, torch first when the side needs it (``--no-deps`` from the chosen PyTorch
index: PyPI's default Linux wheel pulls several GB of CUDA), then the side's requirements from
``pyproject.toml`` under ``constraints.txt``; *project*, airfed itself (a wheel built from the
sources, ``--no-deps``). Then ``check``: the other side's heavy packages are absent, ``pip check``
passes, and the side's entry modules import.

Stdlib only (Python >= 3.11 for ``tomllib``): it runs under the image's interpreter before anything
is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SIDES = ("airflow", "steps", "dev")
#: Distributions that must never be installed on a side (DESIGN.md, "Two environments").
FORBIDDEN = {
    "airflow": ("torch", "flwr", "mlflow", "mlflow-skinny"),
    "steps": ("apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk"),
    "dev": (),
}
#: Modules imported after the install: each side's entry points (a missing top-level dependency
#: fails the build, not the first pod). Lazily imported modules are exercised by the rehearsal.
IMPORTS = {
    "airflow": ("airfed.dag.publish", "airfed.ui.plugin", "airfed.ui.jobs_page", "airfed.runners.kubernetes",
                "airfed.runners.local", "airfed.runners.pod_manifests", "airfed.cli", "fl_tasks.store.s3",
                "fl_tasks.warm"),
    "steps": ("fl_tasks.__main__", "fl_tasks.steps.distribute", "fl_tasks.steps.train", "fl_tasks.steps.validate",
              "fl_tasks.steps.aggregate", "fl_tasks.steps.evaluate", "fl_tasks.steps.register",
              "fl_tasks.store.s3", "examples.digits.client_app"),
    "dev": ("airfed.dag.publish", "fl_tasks.__main__"),
}
#: The one big wheel installed first, alone, from the index of the chosen build (CPU or CUDA).
TORCH = "torch"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a distribution name from requirement {requirement!r}")
    return canonical(match.group(1))


def requirements(side: str, project: Path = PROJECT) -> list[str]:
    """The base dependencies plus the side's extra, self-references (``airfed[a,b]``) expanded."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    name, extras = canonical(meta["name"]), meta.get("optional-dependencies", {})
    if side not in extras:
        raise SystemExit(f"pyproject.toml has no extra {side!r} (extras: {', '.join(sorted(extras))})")
    found: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            if requirement_name(req) == name:  # airfed[airflow,steps]: the union of those extras
                inner = re.search(r"\[([^\]]*)\]", req)
                for extra in (e.strip() for e in (inner.group(1) if inner else "").split(",")):
                    if extra and extra not in seen_extras:
                        seen_extras.add(extra)
                        add(extras[extra])
            elif req not in found:
                found.append(req)

    add(list(meta.get("dependencies", [])))
    seen_extras.add(side)
    add(extras[side])
    return found


def run(argv: list[str], **kwargs) -> None:
    print("+ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)


def make_venv(venv: Path) -> str:
    """Create ``venv`` (if needed) with the interpreter running this script; return its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    return str(python)


def pip(python: str, no_cache_dir: bool) -> list[str]:
    cache = ["--no-cache-dir"] if no_cache_dir else []
    return [python, "-m", "pip", "install", "--disable-pip-version-check", *cache]


def install_deps(side: str, python: str, project: Path, torch_index_url: str | None, no_cache_dir: bool) -> None:
    constraints = str(project / "constraints.txt")
    reqs = requirements(side, project)
    if any(requirement_name(r) == TORCH for r in reqs):
        # Alone and without its dependencies from the build's index; they come from PyPI below.
        index = ["--index-url", torch_index_url] if torch_index_url else []
        run([*pip(python, no_cache_dir), "--no-deps", "-c", constraints, *index, TORCH])
    run([*pip(python, no_cache_dir), "-c", constraints, *reqs])


def install_project(python: str, project: Path, no_cache_dir: bool) -> None:
    # A wheel built from the sources (as in an image), never an editable install; --no-deps: the
    # side's dependencies were installed by install_deps, the other side's must stay out.
    run([*pip(python, no_cache_dir), "--no-deps", "--force-reinstall", str(project)])


_PROBE = """
import importlib.metadata as md, json, sys
print(json.dumps(sorted({d.metadata["Name"] for d in md.distributions() if d.metadata["Name"]})))
"""


def installed(python: str) -> list[str]:
    """Canonical names of the distributions installed in ``python``'s environment."""
    out = subprocess.run([python, "-c", _PROBE], check=True, capture_output=True, text=True).stdout
    return sorted({canonical(n) for n in json.loads(out)})


def check(side: str, python: str) -> None:
    """The other side's packages are absent, ``pip check`` passes, the side's entry modules import."""
    present = set(installed(python))
    wrong = [name for name in FORBIDDEN[side] if name in present]
    if wrong:
        raise Failed(f"the {side} environment must not contain {', '.join(wrong)} "
                     f"(DESIGN.md, 'Two environments'): which requirement pulled it in?")
    run([python, "-m", "pip", "check", "--disable-pip-version-check"])
    # From / so that the installed package is imported, never a source tree in the working directory.
    run([python, "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]", *IMPORTS[side]],
        cwd="/")
    print(f"install_env: {side} environment ok ({len(present)} distributions, none of "
          f"{', '.join(FORBIDDEN[side]) or '-'})", flush=True)


_EXAMPLE_DATA = """
import json, sys, yaml
from fl_tasks.prepare_data import main
sys.exit(main([json.dumps(yaml.safe_load(open(sys.argv[1])))]))
"""


def example_data(python: str, spec: Path) -> None:
    """Create the spec's silo data (``data.prepare``) under ``$AIRFED_HOME`` with the step environment."""
    run([python, "-c", _EXAMPLE_DATA, str(spec)], cwd="/")


class Failed(Exception):
    """A command of the install failed (its output is already on the terminal)."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (Failed, subprocess.CalledProcessError) as exc:
        argv = exc.cmd if isinstance(exc, subprocess.CalledProcessError) else None
        what = f"{' '.join(map(str, argv))[:300]} exited with {exc.returncode}" if argv else str(exc)
        print(f"install_env: FAILED: {what}", file=sys.stderr, flush=True)
        return 1


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install_env.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def target(p: argparse.ArgumentParser, venv: bool) -> None:
        if venv:
            p.add_argument("--venv", type=Path, help="create (or reuse) this virtualenv and install into it")
        p.add_argument("--python", default=None, help="the interpreter to install into (default: this one)")

    p_install = sub.add_parser("install", help="install a side's dependencies and airfed, then check")
    p_install.add_argument("side", choices=SIDES)
    target(p_install, venv=True)
    phase = p_install.add_mutually_exclusive_group()
    phase.add_argument("--deps-only", action="store_true", help="only the dependencies (a Dockerfile's first layer)")
    phase.add_argument("--project-only", action="store_true", help="only airfed itself, then check")
    p_install.add_argument("--torch-index-url", default=os.environ.get("AIRFED_TORCH_INDEX_URL"),
                           help="package index of the torch build (e.g. https://download.pytorch.org/whl/cpu)")
    p_install.add_argument("--no-cache-dir", action="store_true", help="pass --no-cache-dir to pip (images)")
    p_install.add_argument("--project", type=Path, default=PROJECT, help="the airfed source tree")

    p_check = sub.add_parser("check", help="forbidden packages absent, pip check, entry modules import")
    p_check.add_argument("side", choices=SIDES)
    target(p_check, venv=False)

    p_reqs = sub.add_parser("requirements", help="print a side's requirements, one a line")
    p_reqs.add_argument("side", choices=SIDES)
    p_reqs.add_argument("--project", type=Path, default=PROJECT)

    p_data = sub.add_parser("example-data", help="create a spec's silo data (data.prepare) under $AIRFED_HOME")
    p_data.add_argument("spec", type=Path)
    target(p_data, venv=False)

    ns = parser.parse_args(argv)
    if ns.command == "requirements":
        print("\n".join(requirements(ns.side, ns.project)))
        return 0
    python = ns.python or sys.executable
    if ns.command == "install":
        if ns.venv is not None:
            python = make_venv(ns.venv)
        if not ns.project_only:
            install_deps(ns.side, python, ns.project, ns.torch_index_url, ns.no_cache_dir)
        if not ns.deps_only:
            install_project(python, ns.project, ns.no_cache_dir)
            check(ns.side, python)
    elif ns.command == "check":
        check(ns.side, python)
    else:
        example_data(python, ns.spec.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
