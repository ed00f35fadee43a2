"""A recovery base in an object store (the local S3 server) reads back bit-identically."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dtm_ray.engines.checkpoint import BASE_FILE

Q0 = "model.layers.0.self_attn.q_proj.weight"


UP1 = "model.layers.1.mlp.up_proj.weight"


def test_a_base_in_an_object_store_reads_back_bit_identically(tmp_path: Path) -> None:
    from support.s3_server import S3Server

    from dtm_ray.engines.checkpoint import BaseWeights
    from dtm_ray.records.store import RunStore

    server = S3Server()
    try:
        store = RunStore(server.uri("based/run"))  # a URI with a query: the endpoint
        tensors = {Q0: torch.randn(8, 4), UP1: torch.zeros(3, 3)}
        save_file(tensors, tmp_path / "local.safetensors")
        store.write_base_file(2, BASE_FILE, str(tmp_path / "local.safetensors"))
        location = store.base_location(2)
        assert location.startswith(f"s3://{server.bucket}/based/run/base/round-002?")
        base = BaseWeights(location)
        assert base.names == {Q0, UP1}
        assert all(torch.equal(base.get(n), t) for n, t in tensors.items())
        base.close()
    finally:
        server.close()
