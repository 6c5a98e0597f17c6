"""Airflow DAG loader for airfed: every job spec (*.yaml) in this folder becomes a DAG.

Kept tiny on purpose; the work is in ``airfed.dag.publish`` (no torch, flwr, mlflow or user code at parse).
"""

from pathlib import Path

from airfed.dag.publish import publish_dags

publish_dags(globals(), Path(__file__).parent)
