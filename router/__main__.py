"""`python -m router --registry HOST:PORT`: run one router until SIGINT/SIGTERM, then drain."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from router.cache.semantic.config import add_semantic_cache_arguments, semantic_cache_from_args
from router.config import KV_LOAD_FAILURE_POLICIES, MODES, ROUTING_POLICIES, RouterConfig
from router.tenants import add_auth_arguments, tenancy_from_args
from tandem import tls


def parse_config(argv: list[str] | None = None) -> tuple[RouterConfig, str]:
    defaults = RouterConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument("--registry", required=True, metavar="HOST:PORT", help="the cluster's Registry service")
    parser.add_argument("--host", default=defaults["host"].default)
    parser.add_argument("--port", type=int, default=defaults["port"].default, help="gRPC port; 0 picks a free port")
    parser.add_argument("--http-port", type=int, default=defaults["http_port"].default,
                        help="OpenAI-compatible HTTP port (default %(default)s); 0 picks a free port, -1 turns it off")
    parser.add_argument("--model", default=None, help="HF folder, .gguf file or dummy arch (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--load-format", default=defaults["load_format"].default)
    parser.add_argument("--mode", choices=MODES, default=defaults["mode"].default)
    parser.add_argument("--max-queued-requests", type=int, default=defaults["max_queued_requests"].default,
                        help="per pool")
    parser.add_argument("--max-queue-time-s", type=float, default=defaults["max_queue_time_s"].default,
                        help="refuse requests whose estimated queue time exceeds this (0: only their deadline)")
    add_auth_arguments(parser)
    parser.add_argument("--max-local-prefill-length", type=int,
                        default=defaults["max_local_prefill_length"].default,
                        help="prefill prompts with fewer uncached tokens on the decode worker (0: never)")
    parser.add_argument("--redis-url", default=None,
                        help="the cluster's Redis (redis:// or rediss://): the global prefix index; default: none")
    parser.add_argument("--routing-policy", choices=ROUTING_POLICIES, default=defaults["routing_policy"].default,
                        help="cache_aware: least prefill work ahead of the first token, from the prefix index; "
                             "load: queued tokens and free blocks only (default %(default)s)")
    parser.add_argument("--balance-abs-threshold", type=int, default=defaults["balance_abs_threshold"].default,
                        help="cache_aware's hot-spot guard: requests above the least loaded worker (default %(default)s)")
    parser.add_argument("--balance-rel-threshold", type=float, default=defaults["balance_rel_threshold"].default,
                        help="... and times as many (default %(default)s)")
    parser.add_argument("--kv-lease-ms", type=int, default=defaults["kv_lease_ms"].default)
    parser.add_argument("--max-migrations", type=int, default=defaults["max_migrations"].default)
    parser.add_argument("--kv-load-failure-policy", choices=KV_LOAD_FAILURE_POLICIES,
                        default=defaults["kv_load_failure_policy"].default,
                        help="a decode worker that cannot load the KV from the prefill worker: recompute the prompt "
                             "there, or fail the request with UNAVAILABLE (default %(default)s)")
    parser.add_argument("--max-prefill-retries", type=int, default=defaults["max_prefill_retries"].default)
    parser.add_argument("--registry-poll-interval-s", type=float, default=defaults["registry_poll_interval_s"].default)
    parser.add_argument("--stats-poll-interval-s", type=float, default=defaults["stats_poll_interval_s"].default)
    parser.add_argument("--worker-stall-timeout-s", type=float, default=defaults["worker_stall_timeout_s"].default,
                        help="a worker silent this long is routed around and its requests move (default %(default)s)")
    parser.add_argument("--drain-timeout-s", type=float, default=defaults["drain_timeout_s"].default)
    parser.add_argument("--chat-content-special-tokens", action="store_true",
                        help="let chat message content write the template's control tokens (default: content is text)")
    add_semantic_cache_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    tls.add_server_arguments(parser)
    args = parser.parse_args(argv)
    try:
        tenancy = tenancy_from_args(args, os.environ)
        internal_tls = tls.internal_from_args(args)
        tls.front_from_args(args)  # checks the files; the router builds its contexts from the paths
        semantic_cache = semantic_cache_from_args(args)
        config = RouterConfig(
            host=args.host, port=args.port, http_port=args.http_port, registry_address=args.registry, model=args.model,
            load_format=args.load_format, mode=args.mode, max_queued_requests=args.max_queued_requests,
            max_local_prefill_length=args.max_local_prefill_length, kv_lease_ms=args.kv_lease_ms,
            max_migrations=args.max_migrations, max_prefill_retries=args.max_prefill_retries,
            kv_load_failure_policy=args.kv_load_failure_policy,
            registry_poll_interval_s=args.registry_poll_interval_s, stats_poll_interval_s=args.stats_poll_interval_s,
            worker_stall_timeout_s=args.worker_stall_timeout_s, drain_timeout_s=args.drain_timeout_s,
            max_queue_time_s=args.max_queue_time_s, tenancy=tenancy, redis_url=args.redis_url,
            routing_policy=args.routing_policy, balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold, internal_tls=internal_tls,
            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs, semantic_cache=semantic_cache,
            chat_content_special_tokens=args.chat_content_special_tokens,
        )
    except ValueError as e:
        parser.error(str(e))
    return config, args.log_level


async def serve(config: RouterConfig) -> None:
    from router.server import Router

    router = Router(config)
    address = await router.start()
    http = f"http://{router.http_address}" if router.http_address else "off"
    print(f"router listening on {address} (gRPC); OpenAI HTTP {http}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.stop()


def main(argv: list[str] | None = None) -> int:
    config, log_level = parse_config(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
