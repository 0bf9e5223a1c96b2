# syntax=docker/dockerfile:1
# Airflow 3 with the Kubernetes provider and the sd_distill DAG. Its tasks run in trainer-image pods
# (`mode: kubernetes`), so this image holds sd-distill without its dependencies: just the stage registry,
# which the DAG file reads when it is parsed.
#
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/sd-distill/airflow:0.1.0 .   (from the repository root)
#
# The official image at the Airflow version the tests ran with; pin the digest at release.
FROM apache/airflow:3.3.2-python3.11
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --chown=airflow:0 constraints-airflow.txt pyproject.toml README.md /opt/sd-distill/
COPY --chown=airflow:0 src /opt/sd-distill/src
# The official image installs as the airflow user; the provider version is the one constraints-airflow.txt pins.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c /opt/sd-distill/constraints-airflow.txt apache-airflow-providers-cncf-kubernetes \
    && pip install --no-cache-dir --no-deps /opt/sd-distill
COPY --chown=airflow:0 dags/sd_distill.py /opt/airflow/dags/sd_distill.py
