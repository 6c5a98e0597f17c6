"""End to end, one full run: ``airfed run dags/digits_regions.yaml --rounds 3 --json`` through Airflow's
dag.test() on the embedded default (in the test process: ``helpers.airfed_in_process``), each region's
store a separate directory. Every round commits from all three regions, the summary counts accepted
updates per region, no silo's update object exists outside its region's store, ``airfed verify --all``
recomputes both levels, and the model learns as the flat job does."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, airfed_cli, airfed_in_process, json_summary

SPEC = REPO / "dags" / "digits_regions.yaml"
REGIONS = {"us": ["us-east", "us-west"], "eu": ["eu-berlin", "eu-paris"], "asia": ["asia-tokyo", "asia-seoul"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory, airflow_db):
    home = tmp_path_factory.mktemp("e2e-regions") / "home"
    proc = airfed_in_process(home, "run", str(SPEC), "--rounds", "3", "--json")  # the DAG under test, not the process
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return home, json_summary(proc), proc.stdout


def test_three_regional_rounds_commit_with_per_region_counts(run):
    home, summary, out = run
    assert summary["state"] == "success" and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for entry in summary["rounds"]:
        assert {n: c["accepted"] for n, c in entry["regions"].items()} == {"asia": 2, "eu": 2, "us": 2}
        assert all(c["contributed"] for c in entry["regions"].values())
    assert summary["region_stores"] == {n: f"file://{home}/regions/{n}" for n in REGIONS}
    assert "regions asia 2/2, eu 2/2, us 2/2" in out
    accuracies = [r["metrics"]["accuracy"] for r in summary["rounds"]]
    # measured: 0.69, 0.77, 0.91, bit-identical globals to the same six silos run flat; dags/digits.yaml
    # (three larger silos) reaches 0.92 after three rounds
    assert accuracies[-1] >= 0.85 and accuracies[-1] > accuracies[0], accuracies


def test_no_update_object_leaves_its_region(run):
    home, _summary, _ = run
    job_store = home / "store" / "digits_regions"
    assert not list(job_store.rglob("updates/*.safetensors"))
    for region, silos in REGIONS.items():
        root = home / "regions" / region / "digits_regions"
        updates = sorted(p.name for p in root.rglob("updates/*.safetensors"))
        assert updates == sorted(f"{s}.safetensors" for s in silos for _r in range(3))
    # what crossed instead: one partial per region and round, referenced with its sha256
    result = json.loads((job_store / "rounds" / "3" / "result.json").read_text())
    assert sorted(result["regions"]) == sorted(REGIONS)
    for name, outcome in result["regions"].items():
        assert outcome["partial"]["key"] == f"digits_regions/rounds/3/regions/{name}.safetensors"
        assert sorted(outcome["accepted"]) == sorted(REGIONS[name]) and outcome["total_weight"] > 0


def test_verify_recomputes_both_levels(run):
    home, _summary, _ = run
    proc = airfed_cli(home, "verify", str(SPEC), "--all")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "round(s) 1, 2, 3 verified" in proc.stdout
    assert proc.stdout.count("reproduces the forwarded partial") == 9
    assert proc.stdout.count("FedAvg over the partials of asia, eu, us: reproduces the committed global") == 3


def test_all_results_are_in_the_job_store_for_the_ui(run):
    """The regional tier copies the silos' small records up: register and the Jobs page read them."""
    home, _summary, _ = run
    round_dir = home / "store" / "digits_regions" / "rounds" / "1"
    silos = [s for ss in REGIONS.values() for s in ss]
    assert sorted(p.stem for p in (round_dir / "evaluation").glob("*.json")) == sorted(silos)
    assert sorted(p.stem for p in (round_dir / "validation").glob("*.json")) == sorted(silos)
