"""Install one side of an airfed deployment into a Python environment: the images and the rehearsal alike.

The two halves of airfed are installed apart in production (``DESIGN.md``, "Two environments"): the
Airflow image holds Airflow, the cncf-kubernetes provider and airfed's Airflow side; the fl-task image
holds what ``python -m fl_tasks <step>`` needs (torch, flwr, the MLflow client, ...). Each side's
dependencies are declared once, as an extra in ``pyproject.toml`` (``airfed[airflow]``,
``airfed[steps]``), and pinned by ``constraints.txt``. Both Dockerfiles and ``images/rehearse.py`` call
this script, so an image and its rehearsal cannot drift apart.

    python images/install_env.py install SIDE [--venv DIR | --python PY] [--deps-only | --project-only]
                                              [--torch-index-url URL] [--no-cache-dir] [--installer uv|pip]
                                              [--editable]
    python images/install_env.py check SIDE [--python PY] [--installer uv|pip]
    python images/install_env.py requirements SIDE
    python images/install_env.py example-data SPEC.yaml [--python PY]

``install`` runs two phases, which a Dockerfile puts in two layers (dependencies change rarely,
sources often): *deps*, torch first when the side needs it (``--no-deps`` from the chosen PyTorch
index: PyPI's default Linux wheel pulls several GB of CUDA), then the side's requirements from
``pyproject.toml`` under ``constraints.txt``; *project*, airfed itself (a wheel built from the
sources, ``--no-deps``). Then ``check``: the other side's heavy packages are absent, every installed
distribution is at its ``constraints.txt`` pin, ``pip check`` passes, and the side's entry modules import.

The installer is uv when it can be found (the ``uv`` package's binary, as in the dev venv, or ``uv`` on
``PATH``), else pip; ``--installer`` picks one. The Dockerfiles say ``--installer pip``, the installer
the official Airflow image documents for extending it; the rehearsal lets uv build the same
environments in seconds where pip takes minutes. Either way ``check`` proves the result is the
pinned set. uv does not read pip's configuration, so the ``find-links`` pip is configured with (a
machine's directory of local wheels, such as the build machines' CPU torch) are handed to uv too.

Stdlib only (Python >= 3.11 for ``tomllib``): it runs under the image's interpreter before anything
is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
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
PROJECT_NAME = "airfed"
INSTALLERS = ("auto", "uv", "pip")


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


def find_uv() -> str | None:
    """uv's binary: the ``uv`` package's (``uv.find_uv_bin``) or ``uv`` on ``PATH``; None without it."""
    try:
        import uv  # type: ignore[import-not-found]

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def pip_find_links(python: str = sys.executable) -> list[str]:
    """The ``find-links`` locations pip is configured with (its config files and ``PIP_FIND_LINKS``)."""
    try:
        listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    found: list[str] = []
    values = [m.group(1) for m in re.finditer(r"(?m)^\S*find-links='(.*)'$", listed)]
    for value in [*values, os.environ.get("PIP_FIND_LINKS", "")]:
        found += [link for link in value.split() if link not in found]
    return found


@dataclass(frozen=True)
class Installer:
    """pip or uv, as the command lines this script runs: the same pinned set in, the same environment out."""

    uv: str | None = None
    no_cache_dir: bool = False

    @classmethod
    def choose(cls, name: str, no_cache_dir: bool) -> Installer:
        uv = find_uv() if name in ("auto", "uv") else None
        if name == "uv" and uv is None:
            raise Failed("--installer uv: uv not found (pip install uv, or --installer pip)")
        return cls(uv, no_cache_dir)

    @property
    def name(self) -> str:
        return "uv" if self.uv else "pip"

    def make_venv(self, venv: Path) -> str:
        """Create ``venv`` (if needed) with the interpreter running this script; return its python."""
        python = venv / "bin" / "python"
        if not python.exists():
            if self.uv:
                run([self.uv, "venv", "--quiet", "--python", sys.executable, str(venv)])
            else:
                run([sys.executable, "-m", "venv", str(venv)])
        return str(python)

    def install(self, python: str) -> list[str]:
        if self.uv:
            # bytecode compiled at install, as pip does (the images run with PYTHONDONTWRITEBYTECODE)
            links = [arg for link in pip_find_links() for arg in ("--find-links", link)]
            cache = ["--no-cache"] if self.no_cache_dir else []
            return [self.uv, "pip", "install", "--python", python, "--compile-bytecode", *cache, *links]
        cache = ["--no-cache-dir"] if self.no_cache_dir else []
        return [python, "-m", "pip", "install", "--disable-pip-version-check", *cache]

    def reinstall(self) -> str:
        return "--reinstall" if self.uv else "--force-reinstall"

    def check(self, python: str) -> list[str]:
        if self.uv:
            return [self.uv, "pip", "check", "--python", python]
        return [python, "-m", "pip", "check", "--disable-pip-version-check"]


def install_deps(side: str, python: str, project: Path, torch_index_url: str | None, installer: Installer) -> None:
    constraints = str(project / "constraints.txt")
    reqs = requirements(side, project)
    if any(requirement_name(r) == TORCH for r in reqs):
        # Alone and without its dependencies from the build's index; they come from PyPI below.
        index = ["--index-url", torch_index_url] if torch_index_url else []
        run([*installer.install(python), "--no-deps", "-c", constraints, *index, TORCH])
    run([*installer.install(python), "-c", constraints, *reqs])


def install_project(python: str, project: Path, installer: Installer, editable: bool = False) -> None:
    # A wheel built from the sources (as in an image; editable only for the dev venv, ``make install``);
    # --no-deps: the side's dependencies were installed by install_deps, the other side's must stay out.
    target = ["-e", str(project)] if editable else [installer.reinstall(), str(project)]
    run([*installer.install(python), "--no-deps", *target])


_PROBE = """
import importlib.metadata as md, json, sys
print(json.dumps({d.metadata["Name"]: d.version for d in md.distributions() if d.metadata["Name"]}))
"""
#: What a virtualenv brings along, not what a side asks for: left out of the pin check.
BOOTSTRAP = ("pip", "setuptools", "wheel")


def installed_versions(python: str) -> dict[str, str]:
    """Canonical name -> version of the distributions installed in ``python``'s environment."""
    out = subprocess.run([python, "-c", _PROBE], check=True, capture_output=True, text=True).stdout
    return {canonical(name): version for name, version in json.loads(out).items()}


def installed(python: str) -> list[str]:
    """Canonical names of the distributions installed in ``python``'s environment."""
    return sorted(installed_versions(python))


def pins(project: Path = PROJECT) -> dict[str, str]:
    """``constraints.txt`` as canonical name -> pinned version."""
    found = {}
    for line in (project / "constraints.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            found[canonical(name)] = version.strip()
    return found


def off_pin(versions: dict[str, str], pinned: dict[str, str]) -> list[str]:
    """Installed distributions that ``constraints.txt`` does not pin, or pins to another version (a local
    version label such as torch's ``+cpu`` is the same release): whatever installed them, pip or uv, an
    environment holds exactly the pinned set."""
    wrong = []
    for name, version in sorted(versions.items()):
        if name in BOOTSTRAP or name == canonical(PROJECT_NAME):
            continue
        if name not in pinned:
            wrong.append(f"{name} {version} (not in constraints.txt)")
        elif version.split("+", 1)[0] != pinned[name]:
            wrong.append(f"{name} {version} (constraints.txt pins {pinned[name]})")
    return wrong


def check(side: str, python: str, installer: Installer, project: Path = PROJECT) -> None:
    """The other side's packages are absent, every package is at its pinned version, ``pip check``
    passes, the side's entry modules import."""
    versions = installed_versions(python)
    present = set(versions)
    wrong = [name for name in FORBIDDEN[side] if name in present]
    if wrong:
        raise Failed(f"the {side} environment must not contain {', '.join(wrong)} "
                     f"(DESIGN.md, 'Two environments'): which requirement pulled it in?")
    unpinned = off_pin(versions, pins(project))
    if unpinned:
        raise Failed(f"the {side} environment holds what constraints.txt does not pin: {'; '.join(unpinned)}")
    run(installer.check(python))
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
    p_install.add_argument("--no-cache-dir", action="store_true", help="keep no download cache (images)")
    p_install.add_argument("--installer", choices=INSTALLERS, default="auto",
                           help="auto (default): uv if found, else pip")
    p_install.add_argument("--project", type=Path, default=PROJECT, help="the airfed source tree")
    p_install.add_argument("--editable", action="store_true",
                           help="airfed as an editable install of the source tree (the dev venv, make install)")

    p_check = sub.add_parser("check", help="forbidden packages absent, all pinned, pip check, entry modules import")
    p_check.add_argument("side", choices=SIDES)
    target(p_check, venv=False)
    p_check.add_argument("--installer", choices=INSTALLERS, default="auto", help="whose check: uv's or pip's")

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
    # a path is made absolute: the checks run the interpreter from / (never a source tree's imports)
    python = os.path.abspath(ns.python) if ns.python and os.sep in ns.python else (ns.python or sys.executable)
    if ns.command == "install":
        installer = Installer.choose(ns.installer, ns.no_cache_dir)
        print(f"install_env: installing the {ns.side} side with {installer.uv or 'pip'}", flush=True)
        if ns.venv is not None:
            python = installer.make_venv(ns.venv)
        if not ns.project_only:
            install_deps(ns.side, python, ns.project, ns.torch_index_url, installer)
        if not ns.deps_only:
            install_project(python, ns.project, installer, ns.editable)
            check(ns.side, python, installer, ns.project)
    elif ns.command == "check":
        check(ns.side, python, Installer.choose(ns.installer, no_cache_dir=False))
    else:
        example_data(python, ns.spec.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
