"""Example consumer (airflow DAG): batch prediction whenever the digits job commits a new global model.

Scheduled on the Asset that the digits job's register task updates after every committed round.
"""

from datetime import datetime

from airflow.sdk import DAG, Asset, task

DIGITS_MODEL = Asset(name="airfed.digits.model", uri="airfed://digits/digits-mlp", group="airfed")

with DAG(
    dag_id="digits_batch_predict",
    description="Score data with the champion digits model each time a round commits",
    schedule=[DIGITS_MODEL],
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["airfed", "example"],
):

    @task
    def predict() -> dict:
        from examples.digits.predict import predict_with_champion  # imported at run time, not parse time

        return predict_with_champion("digits-mlp")

    predict()
