"""ClusterConfig rejects what the cluster cannot run, naming the field and the allowed values."""
from __future__ import annotations

import pytest

from cluster.config import ClusterConfig


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="pipelined"), "mode"),
    (dict(kv_transport="rdma"), "kv_transport"),
    (dict(num_decode_workers=-1), "num_decode_workers"),
    (dict(prefill_tensor_parallel_size=0), "prefill_tensor_parallel_size"),
    (dict(decode_tensor_parallel_size=0), "decode_tensor_parallel_size"),
    (dict(engine={"role": "decode"}), "engine"),
    (dict(engine={"model": "x.gguf"}), "engine"),
    (dict(kv_offload="yes"), "kv_offload"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ClusterConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(prefill_tensor_parallel_size=2), dict(decode_tensor_parallel_size=1_000_000),
                                    dict(mode="colocated", decode_tensor_parallel_size=9)])
def test_tp_sizes_must_divide_the_models_heads_before_any_worker_starts(kwargs):
    # The default SmolLM2-135M: 9 query heads, 3 KV heads. A worker would refuse these too, but only once Ray had
    # placed (or, for a million ranks, waited forever to place) every rank.
    field = next(iter(k for k in kwargs if k.endswith("tensor_parallel_size")))
    with pytest.raises(ValueError, match=rf"^{field}: must divide the model's num_attention_heads=9 and "
                                         rf"num_key_value_heads=3 \(allowed: 1, 3\), got {kwargs[field]}$"):
        ClusterConfig(**kwargs)


def test_a_model_this_host_cannot_read_leaves_the_tp_check_to_the_workers():
    assert ClusterConfig(model="/nonexistent/model.gguf", prefill_tensor_parallel_size=2).pools()[0] == ("prefill", 1, 2)


def test_pools_and_transport():
    assert ClusterConfig().pools() == [("prefill", 1, 1), ("decode", 1, 1)]
    # TP sizes per pool, and they may differ: the decode side reshards the prefill group's KV.
    assert ClusterConfig(prefill_tensor_parallel_size=3, decode_tensor_parallel_size=1).pools() == [
        ("prefill", 1, 3), ("decode", 1, 1)]
    assert ClusterConfig(mode="colocated", num_colocated_workers=2).pools() == [("both", 2, 1)]
    assert ClusterConfig(model="m.gguf", engine={"max_num_seqs": 8}).engine_options == {"max_num_seqs": 8, "model": "m.gguf"}
    assert ClusterConfig(engine={"max_num_seqs": 8}).engine_options == {"max_num_seqs": 8}
    assert ClusterConfig().resolved_kv_transport == "shm"
    assert ClusterConfig(ray_address="auto").resolved_kv_transport == "tcp"
    assert ClusterConfig(ray_address="auto", kv_transport="shm").resolved_kv_transport == "shm"


def test_kv_offload_is_on_for_cpu_workers_with_a_redis_only():
    redis = "redis://127.0.0.1:6379/0"
    assert ClusterConfig(redis_url=redis).resolved_kv_offload
    assert not ClusterConfig(redis_url=redis, num_gpus_per_rank=1).resolved_kv_offload
    assert ClusterConfig(redis_url=redis, num_gpus_per_rank=1, kv_offload="on").resolved_kv_offload
    assert not ClusterConfig(redis_url=redis, kv_offload="off").resolved_kv_offload
    assert not ClusterConfig(kv_offload="on").resolved_kv_offload  # no Redis, no tier


def test_nixl_without_the_library_is_refused_before_any_worker_starts(monkeypatch):
    from workers.kv_transfer import nixl

    def missing():
        raise ValueError("kv_transport: 'nixl' needs the NIXL library, which is not importable here")

    monkeypatch.setattr(nixl, "nixl_api", missing)
    with pytest.raises(ValueError, match="^kv_transport: 'nixl' needs the NIXL library"):
        ClusterConfig(kv_transport="nixl")
