"""Routing policy, admission, config validation and the pool's view of workers, without a router server."""
from __future__ import annotations

import time

import grpc
import pytest

from router.admission import Admission
from router.config import RouterConfig
from router.errors import RouterError
from router.policy import WorkerLoad, pick_decode, pick_prefill
from tests.router.conftest import wait_for
from tests.router.helpers import Stream, text_request


def load(worker_id, waiting_tokens=0, free_blocks=100, running=0) -> WorkerLoad:
    return WorkerLoad(worker_id, num_waiting_tokens=waiting_tokens, num_free_blocks=free_blocks, num_running=running)


def test_prefill_goes_to_the_fewest_queued_tokens():
    assert pick_prefill([load("a", 500), load("b", 20), load("c", 300)]) == "b"
    assert pick_prefill([load("a", 0, running=3), load("b", 0, running=1)]) == "b"
    assert pick_prefill([]) is None


def test_decode_goes_to_the_most_free_blocks_then_fewest_running():
    assert pick_decode([load("a", free_blocks=10), load("b", free_blocks=90)]) == "b"
    assert pick_decode([load("a", running=5), load("b", running=2)]) == "b"
    assert pick_decode([]) is None


def test_ties_are_spread():
    picks = {pick_decode([load("a"), load("b")]) for _ in range(100)}
    assert picks == {"a", "b"}


@pytest.mark.parametrize("field, value, allowed", [
    ("mode", "split", "disaggregated, colocated"),
    ("max_queued_requests", 0, ">= 1"),
    ("max_local_prefill_length", -1, ">= 0"),
    ("max_migrations", -1, ">= 0"),
    ("port", 70000, "[0, 65535]"),
    ("registry_address", "nowhere", "host:port"),
    ("stats_poll_interval_s", 0, "> 0"),
    ("load_format", "pickle", "auto, safetensors"),
])
def test_config_errors_name_the_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as info:
        RouterConfig(**{"registry_address": "127.0.0.1:1", field: value})
    assert str(info.value).startswith(f"{field}:") and allowed in str(info.value)


def test_config_pools():
    assert RouterConfig(registry_address="h:1").pools == ("prefill", "decode")
    assert RouterConfig(registry_address="h:1", mode="colocated").pools == ("both",)


def test_admission_is_all_or_nothing():
    adm = Admission(("prefill", "decode"), max_queued=1)
    adm.admit(("decode",))
    with pytest.raises(RouterError) as info:
        adm.admit(("prefill", "decode"))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "decode pool" in info.value.message
    assert adm.num_queued("prefill") == 0
    adm.release("decode")
    adm.admit(("prefill", "decode"))
    assert (adm.num_queued("prefill"), adm.num_queued("decode")) == (1, 1)


def test_dispatches_not_yet_in_stats_spread_a_burst(make_env):
    env = make_env(prefill=2, decode=2)
    pool = env.router.pool

    def burst():
        chosen = []
        for _ in range(4):
            w = pool.choose_prefill().worker
            pool.dispatch(w, 100, 7)
            chosen.append(w.worker_id)
        return chosen

    chosen = env.aio.run(_async(burst))
    assert sorted(chosen.count(w.worker_id) for w in env.by_role("prefill")) == [2, 2]


async def _async(fn):
    return fn()


def test_a_request_counts_until_a_stats_report_asked_after_its_first_token(make_env):
    env = make_env(prefill=1, decode=1)
    pool = env.router.pool
    handle = pool.workers[env.by_role("decode")[0].worker_id]

    def dispatch():
        ticket = pool.dispatch(handle, 50, 4)
        return ticket, handle.load()

    ticket, load = env.aio.run(_async(dispatch))
    assert (load.num_waiting_tokens, load.num_free_blocks, load.num_running) == (50, 996, 1)
    time.sleep(0.1)
    assert ticket in handle.pending, "not settled: counted however many reports come"
    env.aio.run(_async(lambda: pool.settle(handle, ticket)))
    assert handle.load().num_waiting_tokens == 0 and handle.load().num_free_blocks == 996
    wait_for(lambda: ticket not in handle.pending, what="the next stats report takes over")


def test_a_worker_marked_down_is_skipped_until_listed_again_with_fresh_stats(make_env):
    env = make_env(prefill=1, decode=2)
    pool = env.router.pool
    first, second = env.by_role("decode")
    env.register([w for w in env.workers if w is not first])  # the registry drops it for now
    wait_for(lambda: first.worker_id not in pool.workers, what="worker dropped")
    env.register(env.workers)
    wait_for(lambda: first.worker_id in pool.workers and pool.workers[first.worker_id].is_up, what="worker back")
    handle = pool.workers[second.worker_id]
    env.aio.run(_async(lambda: pool.mark_down(handle)))
    assert second.worker_id not in {w.worker_id for w in pool.live_workers("decode")}
    wait_for(lambda: handle.is_up, what="revived by registry + stats")
    # Requests keep flowing throughout.
    assert Stream(env.generate(text_request(max_tokens=3))).complete


def test_cli_builds_the_config():
    from router.__main__ import parse_config

    config, log_level = parse_config(["--registry", "10.0.0.1:7000", "--port", "0", "--mode", "colocated",
                                      "--max-queued-requests", "8", "--max-local-prefill-length", "0",
                                      "--kv-lease-ms", "500", "--max-migrations", "1", "--log-level", "debug"])
    assert (config.registry_address, config.port, config.mode, config.max_queued_requests) == (
        "10.0.0.1:7000", 0, "colocated", 8)
    assert (config.max_local_prefill_length, config.kv_lease_ms, config.max_migrations, log_level) == (
        0, 500, 1, "debug")
    with pytest.raises(SystemExit):
        parse_config(["--registry", "10.0.0.1:7000", "--max-queued-requests", "0"])
