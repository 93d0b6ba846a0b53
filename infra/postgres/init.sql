-- The databases of the mole stack, created by the postgres image's entrypoint on the first start of an empty
-- data volume (it runs the files in /docker-entrypoint-initdb.d as POSTGRES_USER, who owns them).
-- To add them to an existing volume, run these two lines with psql.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
