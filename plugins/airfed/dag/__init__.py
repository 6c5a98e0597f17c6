"""From job specs to Airflow DAGs: the builder (step order, task naming, options), the StepCalls of
a round, the next-round trigger that chains rounds, and publish_dags (for the dags/ loader file)."""
