"""What a finished (or running) run yields: the final tables, the export, lm-eval tasks, the
printed summary, `show` and the report."""
