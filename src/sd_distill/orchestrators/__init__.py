"""Airflow and Kubeflow views of the stage registry (``common`` is shared and imports neither)."""
