"""The noise floor of a whole compressing run (the session's FDT-guided run): one noiseless row per
actor per round. (On Ray with made-up engines: tests/integration/test_noise.py.)"""

from __future__ import annotations

from dtm_ray.results.show import load_run, rounds_table


def test_a_normal_run_has_one_noiseless_row_per_actor_per_round(fdt_sparsify_run):
    run, _ = fdt_sparsify_run
    tables = load_run(str(run))
    noise, rounds = tables.noise, sorted(tables.states["round"].unique())
    assert len(rounds) >= 2
    assert sorted(noise["round"].unique()) == rounds
    for round_ in rounds:
        rows = noise[noise["round"] == round_]
        assert sorted(rows["actor"]) == [0, 1]
        assert rows["worker"].str.startswith(("engine-0@", "engine-1@")).all()
        assert rows["node"].str.len().gt(0).all()
    assert (noise["short_prompts"] == 0).all() and (noise["divergent_positions"] == 0).all()
    assert (noise["noise_positions"] == 0).all() and (noise["min_fdt"] == 16).all()
    assert (noise["prompts"] == 8).all() and (noise["seconds"] > 0).all()
    assert not noise["batch_invariant"].any()  # the hf engine on CPU
    shown = rounds_table(tables)
    assert (shown["actor_noise"] == 0).all()
    assert "actor_noise" in (run / "report" / "report.md").read_text()
