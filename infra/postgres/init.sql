-- Run once by the postgres image on an empty data directory: the MLflow database beside Prefect's.
CREATE DATABASE mlflow OWNER unlearning;
