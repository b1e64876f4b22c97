"""The study: CLI (`python -m study.run`), study configuration, Tune wiring and MLflow tracking."""
