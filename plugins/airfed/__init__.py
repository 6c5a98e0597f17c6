"""airfed: federated learning as declarative, scheduled Apache Airflow workflows (Airflow side)."""
