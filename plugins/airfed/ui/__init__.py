"""airfed in the Airflow UI: the plugin, the FL jobs page (HTML from templates, JSON) and the
MLflow extra links of the step operators."""
