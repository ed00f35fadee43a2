"""Pure measurement and compression: metrics, specs, compression math, model state, components
and the decisions over Arrow tables. No Ray, no engine, no I/O."""
