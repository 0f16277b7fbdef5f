-- Run once by the postgres image on an empty volume (docker/compose.yaml): one database per server,
-- since Prefect and MLflow each keep an `alembic_version` table of their own.
CREATE DATABASE prefect OWNER trlm;
CREATE DATABASE mlflow OWNER trlm;
