"""The commands the chart renders, parsed by tandem's own parsers: a flag the CLI does not know would crash-loop
the pod, so it is caught here instead."""
from __future__ import annotations

import argparse
import importlib.util
import shlex

import pytest

from tests.deploy.manifests import one, render_objects
from tests.deploy.test_chart import AUTOSCALER, AUTOSCALER_ON, EVERYTHING, MATRIX, ROUTER

# What Kubernetes (env references) and bash ($VAR) would put in the commands.
ENV = {"$(TANDEM_REDIS_URL)": "redis://:pw@demo-tandem-redis:6379/0", "$TANDEM_REDIS_URL": "redis://:pw@r:6379/0",
       "$(POD_NAMESPACE)": "llm"}


def expand(args: list[str]) -> list[str]:
    out = []
    for a in args:
        for ref, value in ENV.items():
            a = a.replace(ref, value)
        out.append(a)
    return out


def subparser(module, name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem")
    sub = parser.add_subparsers(dest="command", required=True)
    module.add_parser(sub)
    return sub.choices[name]


# Flags issue 13 gives these commands that their CLI does not have yet (being added beside the chart). Only these
# may be missing, and a case that needs one is an expected failure until it lands; any other unknown flag fails.
PENDING_FLAGS: dict[str, set[str]] = {}  # flags the chart uses before the CLI has them: none now


def parse_or_fail(parser: argparse.ArgumentParser, argv: list[str], capsys) -> tuple[argparse.Namespace, list[str]]:
    """The parsed options and the unknown flags, which must be pending ones."""
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} refused the chart's arguments: {capsys.readouterr().err.strip()}")
    flags = [a for a in unknown if a.startswith("--")]
    assert set(flags) <= PENDING_FLAGS.get(parser.prog, set()), f"{parser.prog} does not know {flags}"
    return args, flags


def xfail_if_pending(prog: str, flags: list[str]) -> None:
    if flags:
        pytest.xfail(f"{prog} does not have {' '.join(flags)} yet (issue 13)")


@pytest.mark.parametrize("name", ["cpu-defaults", "nvidia-tp2", "nvidia-p4-d2", "tls-on", "everything"])
def test_controller_command_parses(name, capsys):
    if importlib.util.find_spec("cluster.controller_cli") is None:
        pytest.skip("tandem controller (cluster/controller_cli.py) is not there yet")
    from cluster import controller_cli

    script = one(render_objects(MATRIX[name]), "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["args"][0]
    argv = expand(shlex.split(script.split("exec tandem controller ", 1)[1]))
    args, pending = parse_or_fail(subparser(controller_cli, "controller"), argv, capsys)
    assert pending == []
    assert args.pool_resources and args.follow_nodes and args.registry_port == 50100 and args.ray_address == "auto"
    assert args.redis_url.startswith("redis://") and args.kv_transport == "tcp"
    if name in ("nvidia-tp2", "everything"):
        assert args.tensor_parallel_size == 2 and args.num_gpus_per_worker == 1
        assert args.attention_backend == "triton" and args.cudagraph_capture_sizes == [1, 2, 4, 8, 128]
        assert args.enforce_eager is None  # false: the flag is left out, CUDA graphs on
    if name == "nvidia-p4-d2":
        assert (args.tensor_parallel_size, args.decode_tensor_parallel_size) == (4, 2)


@pytest.mark.parametrize("name", ["autoscaler-on", "everything"])
def test_autoscaler_command_parses(name, capsys):
    from cluster.autoscaler import cli as autoscaler_cli

    values = AUTOSCALER_ON if name == "autoscaler-on" else EVERYTHING
    c = one(render_objects(values), "Deployment", AUTOSCALER)["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["tandem", "autoscaler"]
    args, pending = parse_or_fail(subparser(autoscaler_cli, "autoscaler"), expand(c["args"]), capsys)
    assert args.raycluster == "demo-tandem" and args.namespace == "llm"
    assert args.router_grpc_port == 50051 and args.router_http_port == 8000
    config = autoscaler_cli.planner_config_from_args(args)
    assert config.pools["prefill"].max_replicas == 4 and config.gpu_budget == 8
    xfail_if_pending("tandem autoscaler", pending)


@pytest.mark.parametrize("name", list(MATRIX))
def test_router_command_parses(name, capsys, monkeypatch):
    import router.__main__ as router_main

    c = one(render_objects(MATRIX[name]), "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "router"]
    argv = expand(c["args"])
    # The mounted files do not exist here: parse only, as the router's own parser does before reading them.
    parsed = {}

    def parse_args(self, args=None, namespace=None):
        parsed["args"] = argparse.ArgumentParser.parse_known_args(self, args, namespace)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(SystemExit):
        router_main.parse_config(argv)
    args, unknown = parsed["args"]
    flags = [a for a in unknown if a.startswith("--")]
    assert set(flags) <= PENDING_FLAGS.get("python -m router", set()), f"python -m router does not know {flags}"
    assert args.host == "0.0.0.0" and args.port == 50051 and args.http_port == 8000
    assert args.redis_url == ENV["$(TANDEM_REDIS_URL)"]
    assert args.kv_load_failure_policy == ("fail" if name == "everything" else "recompute")
    xfail_if_pending("python -m router", flags)


@pytest.mark.parametrize("name", ["cpu-defaults", "tls-on", "everything"])
def test_worker_pods_drain_before_they_stop(name, capsys):
    """A worker pod going away (a scale-down names it in workersToDelete, or an eviction) runs `tandem drain` for
    its own IP in preStop; its grace period outlasts the controller's drain timeout, so its requests finish."""
    from cluster import controller_cli

    rc = one(render_objects(MATRIX[name]), "RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]
    controller_args, _ = parse_or_fail(subparser(controller_cli, "controller"),
                                       expand(shlex.split(head.split("exec tandem controller ", 1)[1])), capsys)
    assert controller_args.drain_timeout_s == 60
    for group in rc["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        c = spec["containers"][0]
        script = c["lifecycle"]["preStop"]["exec"]["command"][2]
        assert script.startswith("tandem drain ") and script.endswith(" || true")
        argv = shlex.split(script[len("tandem drain "):-len(" || true")].replace("$POD_IP", "10.0.0.7"))
        parser = argparse.ArgumentParser(prog="tandem")
        controller_cli.add_drain_parser(parser.add_subparsers(dest="command"))
        args, pending = parse_or_fail(parser._subparsers._group_actions[0].choices["drain"], argv, capsys)
        assert pending == []
        assert args.registry == "demo-tandem-registry:50100" and args.node_ip == "10.0.0.7"
        assert args.timeout_s > controller_args.drain_timeout_s
        assert spec["terminationGracePeriodSeconds"] > args.timeout_s
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
        if name != "cpu-defaults":
            assert args.internal_tls_ca_certs  # the registry speaks mTLS there
