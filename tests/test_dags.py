"""The dags/ loader and the DAG it builds, through Airflow's own DagBag."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def test_dag_shape(dags_folder):
    dag = dagbag(dags_folder).dags["digits"]
    assert str(dag.schedule) == "0 3 * * *" or getattr(dag.timetable, "summary", "") == "0 3 * * *"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.is_paused_upon_creation is False
    assert dag.params["rounds"] == 3
    assert dag.params["training"]["lr"] == 0.05
    groups = sorted({t.task_id.split(".")[0] for t in dag.tasks})
    assert groups == [f"round_{i}" for i in sorted(range(1, 11), key=str)]  # max_rounds_per_run: 10
    round_1 = [t.task_id for t in dag.tasks if t.task_id.startswith("round_1.")]
    assert sorted(round_1) == sorted(
        f"round_1.{s}" for s in ("gate", "distribute", "train", "validate", "aggregate", "evaluate", "register")
    )
    train = dag.get_task("round_1.train")
    assert train.is_mapped if hasattr(train, "is_mapped") else type(train).__name__ == "MappedOperator"
    assert dag.get_task("round_2.gate").upstream_task_ids == {"round_1.register"}
    assert dag.get_task("round_1.aggregate").upstream_task_ids == {"round_1.validate"}


def test_parsing_imports_no_heavy_or_user_code(dags_folder):
    code = textwrap.dedent(
        f"""
        import sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(dags_folder)!r})
        assert "digits" in bag.dag_ids, bag.import_errors
        heavy = sorted(m for m in ("torch", "flwr", "mlflow", "examples.digits.client_app") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout
