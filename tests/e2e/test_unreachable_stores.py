"""Object-store URIs against a port nothing listens on: a run dir or a model there ends in one line
naming the endpoint, within the client's time bound (about 20 s each). (The URIs themselves:
tests/unit/test_store_uris.py.) End to end: each waits out the store calls' retries."""

from __future__ import annotations

import time

from support.s3_server import free_port, store_at

from dtm_ray import cli
from dtm_ray.records.store import RETRY_DELAYS_S


def test_an_unreachable_run_dir_store_is_one_line_naming_its_endpoint_within_the_bound(
    capsys,
) -> None:
    port = free_port()
    start = time.monotonic()
    code = cli.main(["show", store_at("runs/gone", port)])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nclosed port run dir: exit {code} in {seconds:.1f} s: {err.strip()[:200]}")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(
        "dtm-ray: error: cannot read run.json in run dir"
    )
    assert "run dir s3://runs/gone?" in err
    assert f"the store at http://127.0.0.1:{port} cannot be reached" in err
    assert err.rstrip().endswith("run the same command again to resume once storage is back")
    # Our retries (RETRY_DELAYS_S) and, per try, the client's two refused connections.
    assert sum(RETRY_DELAYS_S) <= seconds < sum(RETRY_DELAYS_S) + 10


def test_an_unreachable_model_store_is_one_line_naming_its_endpoint_within_the_bound(
    capsys,
) -> None:
    port = free_port()
    start = time.monotonic()
    code = cli.main(["model", store_at("models/tiny", port)])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nclosed port model: exit {code} in {seconds:.1f} s: {err.strip()[:200]}")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("dtm-ray: error: cannot list model s3://")
    assert f"the store at http://127.0.0.1:{port} cannot be reached" in err
    assert sum(RETRY_DELAYS_S) <= seconds < sum(RETRY_DELAYS_S) + 10
