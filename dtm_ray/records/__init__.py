"""The run directory: the schema of every table, atomic Parquet I/O with resume, the lease."""
