"""`tandem`: bring a cluster up (`tandem up`), generate from it (`tandem generate`), look at it (`tandem status`),
and load-test it (`tandem loadtest`); `tandem controller` runs the cluster without a router (Kubernetes)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys

import grpc

from cluster import controller_cli
from cluster.autoscaler import cli as autoscaler_cli
from loadtest import cli as loadtest_cli
from router.cache.semantic.config import add_semantic_cache_arguments, semantic_cache_from_args
from router.config import KV_LOAD_FAILURE_POLICIES
from router.tenants import add_auth_arguments, tenancy_from_args
from tandem import tls
from tandem.redis_store import EmbeddedRedis, StoreConfig
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub.add_parser("up", help="start a local cluster (Ray, workers, router) and serve until Ctrl-C"))
    _add_generate(sub.add_parser("generate", help="stream a completion from a running router"))
    st = sub.add_parser("status", help="pools, workers, queues and KV usage of a running cluster")
    st.add_argument("--address", default=DEFAULT_ADDRESS, help="router host:port (default %(default)s)")
    st.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer <key>'")
    tls.add_client_arguments(st)
    loadtest_cli.add_parser(sub)
    controller_cli.add_parser(sub)
    controller_cli.add_drain_parser(sub)
    autoscaler_cli.add_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return {"up": _up, "generate": _generate, "status": _status, "loadtest": loadtest_cli.run,
            "controller": controller_cli.run, "drain": controller_cli.run_drain,
            "autoscaler": autoscaler_cli.run}[args.command](args)


# --- tandem up ----------------------------------------------------------------------------------------

def _add_up(p: argparse.ArgumentParser) -> None:
    controller_cli.add_cluster_arguments(
        p, redis_help="redis:// or rediss:// URL of a Redis (or Valkey) for the global prefix index and caches; "
                      "default: start an embedded valkey-server on a free loopback port")
    p.add_argument("--host", default="127.0.0.1", help="router address (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="router gRPC port (default %(default)s)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="router OpenAI-compatible HTTP port (default %(default)s); 0 picks a free port, -1 turns it off")
    p.add_argument("--routing-policy", choices=("cache_aware", "load"), default="cache_aware",
                   help="cache_aware: least prefill work ahead of the first token, from the global prefix index; "
                        "load: queued tokens and free blocks only (default %(default)s)")
    p.add_argument("--kv-load-failure-policy", choices=KV_LOAD_FAILURE_POLICIES, default="recompute",
                   help="a decode worker that cannot load the KV from the prefill worker: recompute the prompt "
                        "there, or fail the request with UNAVAILABLE (default %(default)s)")
    add_semantic_cache_arguments(p)
    p.add_argument("--max-local-prefill-length", type=int, default=None,
                   help="prompts with fewer uncached tokens are prefilled on the decode worker")
    p.add_argument("--max-queued-requests", type=int, default=None, help="per-pool admission bound of the router")
    p.add_argument("--max-queue-time-s", type=float, default=None,
                   help="refuse requests whose estimated queue time exceeds this (default: only their deadline)")
    add_auth_arguments(p)
    p.add_argument("--chat-content-special-tokens", action="store_true",
                   help="let chat message content write the template's control tokens (default: content is text)")
    tls.add_server_arguments(p)
    p.add_argument("--autoscale", action="store_true",
                   help="size the pools from the router's metrics (cluster/autoscaler/), between --prefill-min/max "
                        "and --decode-min/max (colocated: --decode-min/max)")
    autoscaler_cli.add_planner_arguments(p, gpus_per_worker=False)


def _max_tp_size(args) -> int:
    """The larger pool's TP size: the planner counts one GPU budget per worker."""
    sizes = (args.prefill_tensor_parallel_size, args.decode_tensor_parallel_size)
    return max(args.tensor_parallel_size if n is None else n for n in sizes)


def _autoscale_config(args):
    """(PlannerConfig, the most workers a pool may reach) for --autoscale, or (None, None). ValueError naming the
    option."""
    if not args.autoscale:
        return None, None
    planner = autoscaler_cli.planner_config_from_args(
        args, mode=args.mode, gpus_per_worker=int(args.num_gpus_per_worker * _max_tp_size(args)))
    initial = {"both": args.workers} if args.mode == "colocated" else {"prefill": args.prefill_workers,
                                                                       "decode": args.decode_workers}
    for role, limits in planner.pools.items():
        opt = "decode" if role == "both" else role
        start_opt = "--workers" if role == "both" else f"--{role}-workers"
        if not limits.min_replicas <= initial[role] <= limits.max_replicas:
            raise ValueError(f"{start_opt}: must be between --{opt}-min ({limits.min_replicas}) and --{opt}-max "
                             f"({limits.max_replicas}) with --autoscale, got {initial[role]}")
    return planner, max(limits.max_replicas for limits in planner.pools.values())


def _check_port_free(host: str, port: int, flag: str) -> None:
    """ValueError naming the flag when something already listens there: found before Ray and the workers start,
    not a minute later when the router binds."""
    if port <= 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"{flag}: cannot listen on {host}:{port}: {e.strerror}") from None


def _up(args) -> int:
    from cluster import session

    try:  # checked before anything starts, in the supervisor too, so that its caller sees the error
        tenancy = tenancy_from_args(args, os.environ)
        tenancy.check_host(args.host)
        internal_tls = tls.internal_from_args(args)
        tls.front_from_args(args)  # used by the router
        if args.redis_url is not None:
            StoreConfig(args.redis_url)
        semantic_cache = semantic_cache_from_args(args)
        autoscale, max_workers = _autoscale_config(args)
        _check_port_free(args.host, args.port, "--port")
        _check_port_free(args.host, args.http_port, "--http-port")
    except ValueError as e:
        print(f"tandem up: {e}", file=sys.stderr)
        return 2
    if not session.is_child():
        return session.run_in_own_session(args.argv)
    session.stop_with_supervisor()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = controller_cli.cluster_config(
            args, internal_tls, scheduling_policy="priority" if any(t.priority for t in tenancy.tenants) else None,
            **({"max_workers_per_pool": max_workers} if max_workers is not None else {}))
    except ValueError as e:
        print(f"tandem up: {e}", file=sys.stderr)
        return 2
    router_options = router_options_from_args(args, tenancy, semantic_cache)
    return asyncio.run(serve(config, args.host, args.port, router_options, autoscale, args.autoscale_interval_s))


def router_options_from_args(args, tenancy, semantic_cache) -> dict:
    """The RouterConfig fields `tandem up` sets from its options (serve() adds the address, registry, model, mode,
    internal TLS and Redis)."""
    options = {k: v for k, v in (("max_local_prefill_length", args.max_local_prefill_length),
                                 ("max_queued_requests", args.max_queued_requests),
                                 ("max_queue_time_s", args.max_queue_time_s)) if v is not None}
    options["http_port"] = args.http_port
    options["tenancy"] = tenancy
    options.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, ssl_ca_certs=args.ssl_ca_certs,
                   ssl_cert_reqs=args.ssl_cert_reqs)
    options["chat_content_special_tokens"] = args.chat_content_special_tokens
    options["routing_policy"] = args.routing_policy
    options["kv_load_failure_policy"] = args.kv_load_failure_policy
    options["semantic_cache"] = semantic_cache
    return options


async def serve(config, host: str, port: int, router_options: dict, autoscale=None,
                autoscale_interval_s: float = 15.0) -> int:
    """Run the controller and one router until SIGINT or SIGTERM, then drain and stop everything. autoscale: a
    PlannerConfig to size the pools with (the autoscaler reads this router, in this process), or None."""
    from cluster.controller import Controller
    from router.config import RouterConfig
    from router.server import Router

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    embedded_redis = None
    if config.redis_url is None:
        embedded_redis = EmbeddedRedis()
        # On this thread: the server gets SIGTERM when the thread that started it dies (EmbeddedRedis).
        config = dataclasses.replace(config, redis_url=embedded_redis.start())
        print(f"tandem: embedded Redis (valkey-server) at {config.redis_url}", flush=True)
    router_options = {**router_options, "redis_url": config.redis_url}
    controller = Controller(config)
    router = autoscaler = None
    try:
        registry = await loop.run_in_executor(None, controller.start)
        router = Router(RouterConfig(host=host, port=port, registry_address=registry, model=config.model,
                                     mode=config.mode, internal_tls=config.internal_tls, **router_options))
        address = await router.start()
        await router.wait_ready(timeout_s=60)
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Again: ray.init() put Ray's C++ failure handler (a stack dump on SIGTERM) in front of ours.
            loop.add_signal_handler(sig, stop.set)
        scheme = "https" if router.config.ssl else "http"
        http = f"{scheme}://{router.http_address}/v1 (OpenAI API)" if router.http_address else "HTTP off"
        if autoscale is not None:
            from cluster.autoscaler.loop import Autoscaler, ControllerActuator
            from cluster.autoscaler.metrics import in_process_collector
            from cluster.autoscaler.planner import Planner

            autoscaler = Autoscaler(Planner(autoscale), ControllerActuator(controller),
                                    in_process_collector(router, loop), autoscale_interval_s, mode=config.mode)
            autoscaler.start()
            bounds = ", ".join(f"{role} {p.min_replicas}-{p.max_replicas}" for role, p in autoscale.pools.items())
            print(f"tandem: autoscaling {bounds} every {autoscale_interval_s:g} s", flush=True)
        print(f"tandem: router listening on {address} (gRPC tandem.v1.Generation) and {http}; "
              f"registry at {registry}; mode {config.mode}. Ctrl-C stops.", flush=True)
        await stop.wait()
        print("tandem: stopping (draining in-flight requests)", flush=True)
    finally:
        if autoscaler is not None:
            await loop.run_in_executor(None, autoscaler.stop)
        if router is not None:
            await router.stop(grace_s=10)
        await loop.run_in_executor(None, controller.stop)
        if embedded_redis is not None:
            embedded_redis.stop()
    print("tandem: stopped", flush=True)
    return 0


# --- tandem generate ----------------------------------------------------------------------------------

def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="router host:port (default %(default)s)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true",
                      help="send the prompt as plain text to continue, not as a chat message")
    form.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (the default)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer <key>'")
    tls.add_client_arguments(p)


# The router's refusal of a chat for a model without a chat template (router/model.py).
_NO_CHAT_TEMPLATE = "has no chat template"


def _generate(args) -> int:
    """Stream one answer to stdout, its summary to stderr. The prompt goes as a user chat message (rendered with
    the model's chat template) unless --raw, or unless the model has no template: then it goes as plain text."""
    sampling = pb.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, stop=args.stop)
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    req = pb.GenerateRequest(sampling=sampling)
    if args.raw:
        req.text = args.prompt
    else:
        req.chat.messages.add(role="user", content=args.prompt)
    if (channel := _channel(args, "generate")) is None:
        return 2
    with channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            return _stream_answer(stub, req, args.timeout, _auth_metadata(args.api_key))
        except grpc.RpcError as e:
            no_template = e.code() == grpc.StatusCode.INVALID_ARGUMENT and _NO_CHAT_TEMPLATE in (e.details() or "")
            if not args.raw and no_template:
                print("tandem generate: the model has no chat template; sending the prompt as plain text",
                      file=sys.stderr)
                req.text = args.prompt  # replaces the chat (one oneof)
                try:
                    return _stream_answer(stub, req, args.timeout, _auth_metadata(args.api_key))
                except grpc.RpcError as e2:
                    e = e2
            print(f"\ntandem generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


def _stream_answer(stub, req: pb.GenerateRequest, timeout: float, metadata) -> int:
    for resp in stub.Generate(req, timeout=timeout, metadata=metadata):
        if resp.HasField("chunk"):
            print(resp.chunk.text, end="", flush=True)
        else:
            c = resp.complete
            t = c.timings
            print(f"\n[{pb.FinishReason.Name(c.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
                  f"prompt {c.usage.prompt_tokens} (cached {c.usage.cached_tokens}), completion "
                  f"{c.usage.completion_tokens} tokens; TTFT {t.first_token_ms:.0f} ms, total {t.e2e_ms:.0f} ms",
                  file=sys.stderr)
            if c.error_message:
                print(f"error: {c.error_message}", file=sys.stderr)
                return 1
    return 0


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _channel(args, command: str) -> grpc.Channel | None:
    """A channel to the router, TLS as the options say; None after printing why the options are bad."""
    try:
        return tls.channel(args.address, tls.client_from_args(args))
    except ValueError as e:
        print(f"tandem {command}: {e}", file=sys.stderr)
        return None


# --- tandem status ------------------------------------------------------------------------------------

def _status(args) -> int:
    if (channel := _channel(args, "status")) is None:
        return 2
    with channel:
        try:
            status = worker_pb2_grpc.ClusterStub(channel).GetStatus(wpb.GetStatusRequest(), timeout=10,
                                                                    metadata=_auth_metadata(args.api_key))
        except grpc.RpcError as e:
            print(f"tandem status: {args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(format_status(status))
    return 0


def format_status(status: wpb.ClusterStatus) -> str:
    lines = [f"mode: {status.mode}    registry: {status.registry_address}", "",
             f"{'pool':<8} {'workers':>7} {'queued':>7} {'max queued':>10}"]
    for p in status.pools:
        lines.append(f"{p.role:<8} {p.num_workers:>7} {p.num_queued:>7} {p.max_queued:>10}")
    lines += ["", f"{'worker':<18} {'role':<8} {'address':<22} {'pid':>7} {'running':>7} {'waiting':>7} "
                  f"{'KV used':>13} {'KV usage':>8} {'held':>5} {'transfers':>9}  metrics"]
    for w in status.workers:
        i = w.info
        lines.append(f"{i.worker_id:<18} {i.role + ('*' if i.draining else ''):<8} {i.address:<22} {i.pid:>7} {w.num_running:>7} {w.num_waiting:>7} "
                     f"{w.num_used_blocks:>6}/{w.num_blocks:<6} {w.kv_cache_usage:>7.1%} {w.num_kv_held:>5} {w.kv_transfers:>9}  "
                     f"{'http://' + i.metrics_address + '/metrics' if i.metrics_address else '-'}")
    if any(w.info.draining for w in status.workers):
        lines.append("* draining: leaving its pool, finishing its requests, taking no new ones")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
