"""Command-line preprocessing pipelines (python -m preprocessing.<name>)."""
