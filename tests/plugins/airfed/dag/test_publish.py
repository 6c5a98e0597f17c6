"""The dags/ loader (``airfed.dag.publish``) through Airflow's own DagBag."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture
def dags_folder(tmp_path) -> Path:
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(REPO / "dags" / "airfed_dags.py", folder)
    shutil.copy(REPO / "dags" / "digits.yaml", folder)
    return folder


def dagbag(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(folder))


def test_broken_spec_is_an_import_error_and_does_not_hide_the_others(dags_folder):
    (dags_folder / "broken.yaml").write_text(
        textwrap.dedent(
            """\
            job: broken
            client_app: examples.digits.client_app:app
            model: {init: examples.digits.model:initial_state}
            silos:
              - name: a
                data: /tmp/a.npz
                colour: red
            """
        )
    )
    (dags_folder / "also-valid.yaml").write_text(
        (dags_folder / "digits.yaml").read_text().replace("job: digits", "job: digits_copy")
    )
    bag = dagbag(dags_folder)
    assert set(bag.dag_ids) == {"digits", "digits_copy"}
    assert len(bag.import_errors) == 1
    (where, message) = next(iter(bag.import_errors.items()))
    assert where.endswith("airfed_dags.py")
    assert f"{dags_folder / 'broken.yaml'}:7: silos[0].colour: unknown field" in message


def test_the_loaded_dag_is_one_round_and_its_trigger(dags_folder):
    dag = dagbag(dags_folder).dags["digits"]
    assert [t.task_id for t in dag.tasks] == [
        "distribute", "train", "validate", "aggregate", "evaluate", "register", "model_event", "next_round"
    ]
    assert dag.params["rounds"] == 3  # rounds_per_run of dags/digits.yaml
    assert "digits__approval" not in dagbag(dags_folder).dag_ids  # promotion.approval: none (the default)


def with_approval(dags_folder: Path) -> None:
    """A copy of digits, job ``gated``, whose champion moves only on a person's approval."""
    text = (dags_folder / "digits.yaml").read_text().replace("job: digits", "job: gated")
    (dags_folder / "gated.yaml").write_text(text.replace("  direction: maximize", "  direction: maximize\n"
                                                         "  approval: required\n  approval_timeout: 600"))


def test_approval_required_adds_the_approval_dag(dags_folder):
    with_approval(dags_folder)
    bag = dagbag(dags_folder)
    assert not bag.import_errors, bag.import_errors
    gated, approval = bag.dags["gated"], bag.dags["gated__approval"]
    assert gated.get_task("request_approval").upstream_task_ids == {"model_event"}
    assert gated.get_task("next_round").upstream_task_ids == {"model_event"}  # rounds never wait on it
    assert [t.task_id for t in approval.tasks] == ["approve", "promote", "model_event"]
    approve = approval.get_task("approve")
    assert approve.options == ["Approve", "Reject"] and approve.defaults == ["Reject"]
    assert approve.response_timeout.total_seconds() == 600
    assert approval.get_task("promote").argv[3] == "promote"


def test_parsing_imports_no_heavy_or_user_code(dags_folder):
    with_approval(dags_folder)
    code = textwrap.dedent(
        f"""
        import sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(dags_folder)!r})
        assert "digits" in bag.dag_ids and "gated__approval" in bag.dag_ids, bag.import_errors
        heavy = sorted(m for m in ("torch", "flwr", "mlflow", "examples.digits.client_app") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout
