"""The job file: its dataclasses and `--set`, the checks against the model, the resume rules and
the lm-eval task names. Imports no torch, Ray or lm-eval, so a bad job fails at once."""
