"""Ray: the thin engine actor and the pool that fans calls out to actors. Knows nothing of jobs:
it is handed a model, engine settings and resources."""
