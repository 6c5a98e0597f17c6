"""``airfed aggregate`` and ``airfed verify``.

aggregate: the command's output equals Flower's own functions / strategy objects on random updates
generated here with torch (independently of tests/fl_tasks/test_strategies.py's NumPy generator).
verify: rounds produced by the real step modules (distribute, train, validate, aggregate on the
digits example, FedAdam so the server optimiser state is chained through HEAD) verify cleanly, and
changing one stored byte of any referenced object makes verify exit 1 naming that key.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from airfed.cli import main as airfed
from flower_reference import serverapp_train
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.serverapp import strategy as serverapp
from safetensors.numpy import load_file
from safetensors.torch import save_file

from fl_tasks.strategies import resolved_params

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"encoder.weight": (48, 16), "encoder.bias": (48,), "decoder.weight": (5, 48), "temperature": ()}


def torch_updates(tmp_path: Path, n: int, seed: int, base: dict | None = None, tag: str = "t"):
    gen = torch.Generator().manual_seed(seed)
    files, results = [], []
    for i in range(n):
        state = {}
        for name, shape in SHAPES.items():
            noise = torch.randn(shape, generator=gen)
            if base is None:
                state[name] = noise * 2
            else:  # a common drift keeps FedOpt's division by |delta| well-conditioned
                drift = 0.05 * torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(seed + 99)))
                state[name] = base[name] + drift + 0.01 * noise
        weight = int(torch.randint(1, 300, (), generator=gen))
        path = tmp_path / f"{tag}{seed}_{i}.safetensors"
        save_file(state, str(path))
        files.append((path, weight))
        results.append(([state[name].numpy() for name in SHAPES], weight))
    return files, results


def run_aggregate(tmp_path: Path, strategy: str, files, *extra: str, weights: bool = True, out: str = "out"):
    out_path = tmp_path / f"{out}.safetensors"
    args = ["aggregate", "--strategy", strategy, "--out", str(out_path), *extra]
    args += [f"{p}={w}" if weights else str(p) for p, w in files]
    assert airfed(args) == 0
    got = load_file(str(out_path))
    return [got[name] for name in SHAPES]


def assert_close(ours, theirs):
    for got, want in zip(ours, theirs, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np.asarray(want, dtype=np.float64), rtol=2e-6, atol=2e-6)


CASES = [
    ("FedAvg", [], True, aggregate),
    ("FedProx", ["--param", "proximal_mu=0.01"], True, aggregate),
    ("FedMedian", [], False, aggregate_median),
    ("FedTrimmedAvg", ["--param", "beta=0.25"], False, lambda res: aggregate_trimmed_avg(res, 0.25)),
    ("Krum", ["--param", "num_malicious_nodes=2"], False, lambda res: aggregate_krum(res, 2, 0)),
    ("MultiKrum", ["--param", "num_malicious_nodes=2", "--param", "num_nodes_to_select=3"], True,
     lambda res: aggregate_krum(res, 2, 3)),
    ("Bulyan", ["--param", "num_malicious_nodes=1"], False,
     lambda res: serverapp_train(serverapp.Bulyan, res, num_malicious_nodes=1)),
    ("Bulyan", [], False, lambda res: aggregate_bulyan(copy.deepcopy(res), 0, aggregate_krum, to_keep=0)),
]


def test_legacy_parameter_names_work_with_a_deprecation_line(tmp_path, capsys):
    files, results = torch_updates(tmp_path, 8, seed=5)
    ours = run_aggregate(tmp_path, "Krum", files, "--param", "num_malicious_clients=2", weights=False)
    assert_close(ours, aggregate_krum(results, 2, 0))
    err = capsys.readouterr().err
    assert "deprecated: strategy: num_malicious_clients is a legacy Flower name; use num_malicious_nodes" in err


@pytest.mark.parametrize("strategy,extra,weighted,flower", CASES, ids=[f"{c[0]}{len(c[1])}" for c in CASES])
def test_aggregate_equals_flower(tmp_path, capsys, strategy, extra, weighted, flower):
    files, results = torch_updates(tmp_path, 8, seed=len(strategy) + len(extra))
    ours = run_aggregate(tmp_path, strategy, files, *extra, weights=weighted)
    assert_close(ours, flower(results))
    assert f"{strategy} over 8 update(s)" in capsys.readouterr().out


def test_aggregate_server_optimizers_carry_state_like_flower(tmp_path):
    base = {name: torch.randn(shape, generator=torch.Generator().manual_seed(1)) for name, shape in SHAPES.items()}
    for cls, strategy, params in [
        (FedAdam, "FedAdam", {"eta": 0.05, "beta_2": 0.9}),
        (FedAvgM, "FedAvgM", {"server_learning_rate": 0.8, "server_momentum": 0.5}),
        (FedAdagrad, "FedAdagrad", {"eta": 0.03}),
        (FedYogi, "FedYogi", {"tau": 0.01}),
    ]:
        flower = cls(initial_parameters=ndarrays_to_parameters([base[n].numpy() for n in SHAPES]),
                     **resolved_params(strategy, params))  # Flower's legacy classes: older defaults
        glob = tmp_path / f"{strategy}_g1.safetensors"
        save_file(base, str(glob))
        current, state_in = base, None
        for rnd in (1, 2):
            files, results = torch_updates(tmp_path, 3, seed=rnd, base=current, tag=f"{strategy}{rnd}_")
            ok = Status(code=Code.OK, message="")
            fit = [(None, FitRes(ok, ndarrays_to_parameters(a), n, {})) for a, n in results]
            want = parameters_to_ndarrays(flower.aggregate_fit(rnd, fit, [])[0])
            extra = [x for k, v in params.items() for x in ("--param", f"{k}={v}")]
            extra += ["--global", str(glob), "--state-out", str(tmp_path / f"{strategy}_s{rnd}.safetensors")]
            if state_in:
                extra += ["--state-in", str(state_in)]
            ours = run_aggregate(tmp_path, strategy, files, *extra, out=f"{strategy}_g{rnd + 1}")
            assert_close(ours, want)
            glob = tmp_path / f"{strategy}_g{rnd + 1}.safetensors"
            state_in = tmp_path / f"{strategy}_s{rnd}.safetensors"
            current = {n: torch.from_numpy(a) for n, a in zip(SHAPES, ours, strict=True)}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategy", "FedMagic"], "unknown strategy 'FedMagic'"),
        (["--strategy", "FedAvg", "--param", "beta=0.1"],
         "parameter 'beta' of FedAvg: unknown parameter for FedAvg; accepted: none"),
        (["--strategy", "FedTrimmedAvg", "--param", "beta=lots"],
         "parameter 'beta' of FedTrimmedAvg: Input should be a valid number (got 'lots'"),
        (["--strategy", "FedTrimmedAvg", "--param", "beta=0.7"],
         "parameter 'beta' of FedTrimmedAvg: Input should be less than 0.5 (got 0.7"),
        (["--strategy", "Krum", "--param", "num_malicious_nodes=1.5"],
         "parameter 'num_malicious_nodes' of Krum: Input should be a valid integer"),
        (["--strategy", "FedAvg", "--param", "novalue"], "expected key=value"),
        (["--strategy", "FedAvg", "NOWEIGHT"], "has no weight: FedAvg weights updates by their example counts"),
        (["--strategy", "FedMedian", "missing.safetensors"], "missing.safetensors: no such file"),
        (["--strategy", "FedAvg", "x.safetensors=many"], "is not a number"),
    ],
)
def test_aggregate_errors_are_clear(tmp_path, capsys, args, message):
    files, _ = torch_updates(tmp_path, 2, seed=0)
    args = [a.replace("NOWEIGHT", str(files[0][0])) for a in args]
    if not any(a.endswith(".safetensors") or "=" in a and a.split("=")[0].endswith(".safetensors") for a in args):
        args += [f"{files[0][0]}=3"]
    code = airfed(["aggregate", "--out", str(tmp_path / "o.safetensors"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_aggregate_refuses_mismatched_updates(tmp_path, capsys):
    files, _ = torch_updates(tmp_path, 2, seed=0)
    save_file({"encoder.weight": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    code = airfed(["aggregate", "--strategy", "FedMedian", "--out", str(tmp_path / "o.safetensors"),
                   *[str(p) for p, _ in files], str(tmp_path / "odd.safetensors")])
    assert code == 1 and "odd.safetensors: tensors differ" in capsys.readouterr().err


def test_aggregate_command_line_entry_point(tmp_path):
    """The real ``airfed`` process (no torch/flwr needed for aggregation)."""
    files, results = torch_updates(tmp_path, 4, seed=3)
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from airfed.cli import main; rc = main(sys.argv[1:]); "
         "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'mlflow')]; sys.exit(rc)",
         "aggregate", "--strategy", "FedAvg", "--out", str(out), *[f"{p}={w}" for p, w in files]],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(out))
    assert_close([got[n] for n in SHAPES], aggregate(results))


# -- verify ---------------------------------------------------------------------------------------------
JOB = "verifyjob"


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """Two rounds of a FedAdam job, run by the real step modules against a local store and registered
    in the embedded MLflow (so ``verify --all`` can check the registry against the store)."""
    from airfed.spec import load_spec

    root = tmp_path_factory.mktemp("verify")
    home = root / "home"
    spec_path = root / f"{JOB}.yaml"
    spec_path.write_text(yaml.safe_dump({
        "job": JOB,
        "client_app": "examples.digits.client_app:app",
        "model": {"init": "examples.digits.model:initial_state"},
        "strategy": {"name": "FedAdam", "params": {"eta": 0.02}},
        "training": {"local-epochs": 1, "lr": 0.05, "batch-size": 64},
        "data": {"prepare": "examples.digits.data:prepare", "options": {"partition": "iid", "seed": 3}},
        "silos": [{"name": s, "data": f"${{AIRFED_HOME}}/data/{JOB}/{s}.npz"} for s in ("north", "south")],
    }))
    spec = load_spec(spec_path)
    env = {"AIRFED_HOME": str(home), "AIRFED_STORE_URL": f"file://{home / 'store'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "AIRFED_SPEC": spec.step_payload(), "PYTHONPATH": str(REPO)}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        from fl_tasks.__main__ import main as step
        from fl_tasks.prepare_data import main as prepare

        assert prepare([spec.step_payload()]) == 0
        for rnd in (1, 2):
            run_id = f"manual__{rnd}"
            step(["distribute", "--job", JOB, "--round", "next", "--run-id", run_id])
            for stage in ("train", "validate"):
                for silo in ("north", "south"):
                    step([stage, "--job", JOB, "--round", str(rnd), "--run-id", run_id, "--silo", silo])
            step(["aggregate", "--job", JOB, "--round", str(rnd), "--run-id", run_id])
            for silo in ("north", "south"):
                step(["evaluate", "--job", JOB, "--round", str(rnd), "--run-id", run_id, "--silo", silo])
            step(["register", "--job", JOB, "--round", str(rnd), "--run-id", run_id])
    finally:
        mp.undo()
    return spec_path, home


def verify(spec_path: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m airfed.cli verify``: the command a user runs, in its own process."""
    env = {"AIRFED_HOME": str(home), "AIRFED_STORE_URL": f"file://{home / 'store'}", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO / "plugins") + ":" + str(REPO)}
    return subprocess.run([sys.executable, "-m", "airfed.cli", "verify", str(spec_path), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture
def verify_here(monkeypatch, capsys):
    """``airfed verify`` through the CLI's entry function in this process (as ``verify`` but without an
    interpreter start): (exit code, stdout)."""
    from airfed.cli import main

    def run(spec_path: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
        with monkeypatch.context() as patch:
            for name in [n for n in os.environ if n.startswith(("AIRFED_", "MLFLOW_"))]:
                patch.delenv(name)
            patch.setenv("AIRFED_HOME", str(home))
            patch.setenv("AIRFED_STORE_URL", f"file://{home / 'store'}")
            capsys.readouterr()
            code = main(["verify", str(spec_path), *args])
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["airfed", "verify"], code, out, err)

    return run


def test_verify_passes_on_committed_rounds(committed):
    spec_path, home = committed
    store = home / "store" / JOB
    head = json.loads((store / "HEAD.json").read_text())
    assert head["round"] == 2 and head["server_state"]["key"] == f"{JOB}/rounds/2/server_state.safetensors"
    result2 = json.loads((store / "rounds/2/result.json").read_text())
    assert result2["server_state_in"] == json.loads((store / "rounds/1/result.json").read_text())["server_state"]

    proc = verify(spec_path, home, "--all")
    print(proc.stdout)  # shown with -s: the report a user sees
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAIL" not in out
    for r in (1, 2):
        assert f"ok    {JOB}/rounds/{r + 1}/global.safetensors: recomputed FedAdam over 2 accepted update(s)" in out
        assert f"ok    {JOB}/rounds/{r}/updates/north.safetensors: update of north: sha256" in out
        assert f"ok    {JOB}/rounds/{r}/server_state.safetensors: recomputed FedAdam" in out
    assert f"ok    {JOB}/rounds/2/result.json: sha256 matches HEAD.json's result_sha256" in out
    assert f"ok    {JOB}/rounds/1/result.json: sha256 matches round 2's plan" in out
    for r in (1, 2):
        assert f"round {r}: global_sha256 matches the store's committed global" in out
    assert "verified" in out.splitlines()[-1]

    default = verify(spec_path, home)  # HEAD's round only
    assert default.returncode == 0 and "== verifyjob round 2" in default.stdout and "round 1\n" not in default.stdout


@pytest.mark.parametrize(
    "key",
    [
        "rounds/1/updates/south.safetensors",
        "rounds/2/global.safetensors",  # round 1's new global (and round 2's input)
        "rounds/3/global.safetensors",
        "rounds/1/server_state.safetensors",
        "rounds/2/result.json",
        "rounds/1/updates/north.json",
    ],
)
def test_verify_fails_naming_the_changed_object(committed, tmp_path, key, verify_here):
    spec_path, home = committed
    copy_home = tmp_path / "home"
    shutil.copytree(home / "store", copy_home / "store")
    target = copy_home / "store" / JOB / key
    data = bytearray(target.read_bytes())
    position = len(data) - 3 if key.endswith(".safetensors") else data.index(b'"num_examples": ') + 16
    data[position] = (data[position] + 1) % 256 if key.endswith(".safetensors") else ord("9")
    target.write_bytes(bytes(data))
    proc = verify_here(spec_path, copy_home, "--all")
    assert proc.returncode == 1, proc.stdout
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert fails and any(f"{JOB}/{key}" in line for line in fails), proc.stdout
    assert "FAILED" in proc.stdout.splitlines()[-1]


def test_verify_detects_a_recomputation_mismatch(committed, tmp_path, verify_here):
    """An aggregator that wrote a different model and recorded its checksum consistently is caught by
    the recomputation, not by the checksums."""
    from fl_tasks.store import sha256_bytes, sha256_file

    spec_path, home = committed
    copy_home = tmp_path / "home"
    shutil.copytree(home / "store", copy_home / "store")
    store = copy_home / "store" / JOB
    target = store / "rounds/3/global.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] = (data[-3] + 1) % 256
    target.write_bytes(bytes(data))
    result = json.loads((store / "rounds/2/result.json").read_text())
    result["new_global"]["sha256"] = sha256_file(target)
    raw = (json.dumps(result, indent=2, sort_keys=True) + "\n").encode()
    (store / "rounds/2/result.json").write_bytes(raw)
    head = json.loads((store / "HEAD.json").read_text())
    head.update(global_sha256=result["new_global"]["sha256"], result_sha256=sha256_bytes(raw))
    (store / "HEAD.json").write_text(json.dumps(head, indent=2, sort_keys=True) + "\n")
    proc = verify_here(spec_path, copy_home)
    assert proc.returncode == 1
    assert f"FAIL  {JOB}/rounds/3/global.safetensors: recomputed FedAdam" in proc.stdout
    assert "does not reproduce the committed global" in proc.stdout
