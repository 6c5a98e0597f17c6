"""Example consumer (airflow DAG): batch prediction whenever the digits job's champion moves.

Scheduled on the Asset the digits job updates: every committed round (its ``model_event`` task),
and every approval that moves `champion` (when the job asks for approval). Each event's ``extra``
carries the round, the version, its metrics, whether `champion` moved and the global model's store
key and sha256, so this DAG asks MLflow nothing: ``champion_moved`` reads its inlet events and stops
the run (short-circuit) unless the champion moved; ``predict`` scores with exactly that model.
"""

from datetime import datetime

from airflow.sdk import DAG, Asset, task

DIGITS_MODEL = Asset(name="airfed.digits.model", uri="airfed://digits/digits-mlp", group="airfed")

with DAG(
    dag_id="digits_batch_predict",
    description="Score data with the digits model each time it becomes champion",
    schedule=[DIGITS_MODEL],
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["airfed", "example"],
):

    @task.short_circuit(inlets=[DIGITS_MODEL])
    def champion_moved(triggering_asset_events=None, inlet_events=None) -> dict | None:
        """The newest event that moved the champion: of those that triggered this run, else (a manual
        run) the Asset's newest event. None ends the run here."""
        events = list((triggering_asset_events or {}).get(DIGITS_MODEL, [])) or list(inlet_events[DIGITS_MODEL][-1:])
        moved = [e.extra for e in events if (e.extra or {}).get("champion_moved")]
        if not moved:
            print(f"champion did not move in {len(events)} event(s): nothing to score")
            return None
        return moved[-1]

    @task
    def predict(event: dict) -> dict:
        from examples.digits.predict import predict_with_model  # imported at run time, not parse time

        return predict_with_model(event["registry_model"], event["version"], event["global"]["key"],
                                  event["global"]["sha256"])

    predict(champion_moved())
