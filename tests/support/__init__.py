"""What the tests share, as plain functions (the fixtures are in tests/conftest.py): the tiny job
and the ways to run it (`jobs`), checks on finished runs (`checks`), the test clusters
(`cluster`), the local S3 server (`s3_server`), the fault injectors (`faults`,
`driver_with_faults`, `two_node_cluster`) and the independent references (`transformers_check`).

Importable as `support` (pyproject's pytest `pythonpath` holds tests/). No test module imports
another test module or a conftest: what two tests share lives here.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
