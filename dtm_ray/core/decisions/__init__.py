"""Decisions: pure functions from probe tables and the current state to the next state.

No Ray, no torch, no I/O: each decision reads Arrow tables or plain mappings and returns plain
values, so it can be unit tested on hand-made tables and recomputed from a run directory.

- `sparsify` — FDT-guided sparsification (the DTM paper's Algorithm 1) and its baselines.
"""
