"""`tandem up`'s router options reach the RouterConfig its router runs with (parsed by `tandem up`'s own parser,
no cluster started)."""
from __future__ import annotations

import argparse

import pytest

from cluster import cli
from router.config import RouterConfig
from router.tenants import tenancy_from_args


def router_config(*argv: str) -> RouterConfig:
    parser = argparse.ArgumentParser(prog="tandem up")
    cli._add_up(parser)
    args = parser.parse_args(list(argv))
    options = cli.router_options_from_args(args, tenancy_from_args(args, {}), None)
    return RouterConfig(registry_address="127.0.0.1:50100", **options)


def test_kv_load_failure_policy_reaches_the_router():
    config = router_config("--kv-load-failure-policy", "fail", "--routing-policy", "load")
    assert (config.kv_load_failure_policy, config.routing_policy) == ("fail", "load")
    config = router_config()
    assert (config.kv_load_failure_policy, config.routing_policy) == ("recompute", "cache_aware")


def test_an_unknown_kv_load_failure_policy_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        router_config("--kv-load-failure-policy", "abort")
    err = capsys.readouterr().err
    assert "--kv-load-failure-policy: invalid choice: 'abort'" in err and "'recompute', 'fail'" in err
