"""End-to-end recipes that glue data, models, training and evaluation (used by the CLI)."""
