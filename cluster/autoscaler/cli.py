"""`tandem autoscaler`: the autoscaler as its own process, and the planner options `tandem up --autoscale`
shares. Two actuators: `kubernetes` patches a RayCluster's worker groups (the chart's autoscaler Deployment);
`registry` sizes a running controller's pools through its registry (`tandem up`, `tandem controller`).

    tandem autoscaler --namespace NS --raycluster NAME --router-selector app.kubernetes.io/component=router \\
        --ttft-slo-s 2 --tpot-slo-s 0.1 --gpu-budget 16 --prefill-min 1 --prefill-max 4 --decode-min 1 ...
    tandem autoscaler --actuator registry --registry 127.0.0.1:50100 --router 127.0.0.1:50051 --decode-max 3
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cluster.autoscaler.planner import PlannerConfig, PoolLimits

API_KEY_ENV = "TANDEM_API_KEY"


def add_planner_arguments(p: argparse.ArgumentParser, pools_default: tuple[int, int] = (1, 4),
                          gpus_per_worker: bool = True) -> None:
    """gpus_per_worker: offer --gpus-per-worker (tandem up derives it from its own GPU options instead)."""
    g = p.add_argument_group("autoscaler", "sizes the prefill and decode pools apart (cluster/autoscaler/)")
    lo, hi = pools_default
    for role in ("prefill", "decode"):
        g.add_argument(f"--{role}-min", type=int, default=None, metavar="N",
                       help=f"fewest {role} workers (default: the RayCluster group's minReplicas, else {lo})")
        g.add_argument(f"--{role}-max", type=int, default=None, metavar="N",
                       help=f"most {role} workers (default: the RayCluster group's maxReplicas, else {hi})")
    defaults = PlannerConfig()
    g.add_argument("--ttft-slo-s", type=float, default=defaults.ttft_slo_s, help="p90 TTFT target (%(default)s)")
    g.add_argument("--tpot-slo-s", type=float, default=defaults.tpot_slo_s, help="p90 TPOT target (%(default)s)")
    g.add_argument("--gpu-budget", type=int, default=None, help="most GPUs the pools may hold together")
    if gpus_per_worker:
        g.add_argument("--gpus-per-worker", type=int, default=0,
                       help="GPUs one worker takes (its tensor-parallel size on GPU; 0 on CPU)")
    g.add_argument("--prefill-tokens-per-s", type=float, default=None,
                   help="one prefill worker's measured capacity, prompt tokens/s (default: learned from the load)")
    g.add_argument("--autoscale-interval-s", type=float, default=15.0, help="between decisions (%(default)s)")
    g.add_argument("--manual-override-hold-s", type=float, default=defaults.manual_override_hold_s,
                   help="how long a pool resized by hand is left alone (%(default)s)")
    g.add_argument("--warmup-s", type=float, default=defaults.warmup_s,
                   help="latency and queue after a worker became ready are ignored this long (%(default)s)")


def planner_config_from_args(args, mode: str = "disaggregated", limits: dict[str, tuple[int, int]] | None = None,
                             gpus_per_worker: int | None = None) -> PlannerConfig:
    """ValueError naming the option for a bad value. limits: bounds read from the RayCluster, used where the
    options leave them out. gpus_per_worker: in place of --gpus-per-worker (tandem up derives it)."""
    if gpus_per_worker is None:
        gpus_per_worker = args.gpus_per_worker
    roles = ("both",) if mode == "colocated" else ("prefill", "decode")
    pools = {}
    for role in roles:
        opt = "decode" if role == "both" else role
        lo_default, hi_default = (limits or {}).get(role, (1, 4))
        lo = getattr(args, f"{opt}_min")
        hi = getattr(args, f"{opt}_max")
        try:
            pools[role] = PoolLimits(lo_default if lo is None else lo, hi_default if hi is None else hi,
                                     gpus_per_worker)
        except ValueError as e:
            raise ValueError(f"--{opt}-min/--{opt}-max: {e}") from None
    if not 0 < args.autoscale_interval_s <= 3600:
        raise ValueError(f"--autoscale-interval-s: must be in (0, 3600], got {args.autoscale_interval_s}")
    try:
        return PlannerConfig(pools=pools, ttft_slo_s=args.ttft_slo_s, tpot_slo_s=args.tpot_slo_s,
                             gpu_budget=args.gpu_budget, prefill_tokens_per_s_per_replica=args.prefill_tokens_per_s,
                             manual_override_hold_s=args.manual_override_hold_s, warmup_s=args.warmup_s)
    except ValueError as e:
        name = str(e).split(":", 1)[0]
        flag = {"ttft_slo_s": "--ttft-slo-s", "tpot_slo_s": "--tpot-slo-s", "gpu_budget": "--gpu-budget",
                "warmup_s": "--warmup-s", "manual_override_hold_s": "--manual-override-hold-s",
                "prefill_tokens_per_s_per_replica": "--prefill-tokens-per-s"}.get(name)
        raise ValueError(f"{flag}: {str(e).split(':', 1)[1].strip()}" if flag else str(e)) from None


def add_parser(sub) -> None:
    from tandem import tls

    p = sub.add_parser("autoscaler", help="size the prefill and decode pools of a tandem RayCluster on Kubernetes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actuator", choices=("kubernetes", "registry"), default="kubernetes",
                   help="kubernetes: patch --raycluster's worker groups; registry: ScalePool on --registry "
                        "(default %(default)s)")
    p.add_argument("--registry", default=None, metavar="HOST:PORT",
                   help="the controller's registry, for --actuator registry (cluster TLS: --internal-tls-*)")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                   help="the RayCluster's and routers' namespace (default: $POD_NAMESPACE, else default)")
    p.add_argument("--raycluster", default=None, help="the RayCluster's name, for --actuator kubernetes")
    p.add_argument("--prefill-group", default="prefill", help="its prefill worker group (%(default)s)")
    p.add_argument("--decode-group", default="decode", help="its decode worker group (%(default)s)")
    p.add_argument("--router-selector", default=None,
                   help="label selector of the router pods, whose metrics drive the planner")
    p.add_argument("--router", action="append", default=[], metavar="HOST:PORT",
                   help="a router's gRPC address, instead of (or besides) --router-selector; repeatable")
    p.add_argument("--router-grpc-port", type=int, default=50051)
    p.add_argument("--router-http-port", type=int, default=8000, help="where routers serve /metrics")
    p.add_argument("--api-key", default=None, help=f"for the routers' GetStatus (default: ${API_KEY_ENV})")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="serve the autoscaler's own /metrics here (%(default)s; 0: off)")
    p.add_argument("--dry-run", action="store_true", help="decide and log, change nothing")
    p.add_argument("--log-level", default="INFO")
    add_planner_arguments(p)
    tls.add_client_arguments(p)
    g = p.add_argument_group("cluster TLS", "for --actuator registry when the cluster runs --internal-tls-*")
    g.add_argument("--internal-tls-certfile", default=None)
    g.add_argument("--internal-tls-keyfile", default=None)
    g.add_argument("--internal-tls-ca-certs", default=None)
    g.add_argument("--internal-tls-server-name", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import grpc
    from kubernetes import client, config

    from cluster.autoscaler.kubernetes import KubeRayActuator
    from cluster.autoscaler.loop import Autoscaler, AutoscalerMetrics
    from cluster.autoscaler.metrics import RouterScraper
    from cluster.autoscaler.planner import Planner
    from cluster.autoscaler.registry import RegistryActuator
    from tandem import tls

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.router and not args.router_selector:
        print("tandem autoscaler: --router-selector (router pods) or --router HOST:PORT: give one", file=sys.stderr)
        return 2
    if args.actuator == "kubernetes" and not args.raycluster:
        print("tandem autoscaler: --raycluster: required with --actuator kubernetes", file=sys.stderr)
        return 2
    if args.actuator == "registry" and not args.registry:
        print("tandem autoscaler: --registry: required with --actuator registry", file=sys.stderr)
        return 2
    if args.router_selector and args.actuator != "kubernetes":
        print("tandem autoscaler: --router-selector: needs --actuator kubernetes (it lists pods)", file=sys.stderr)
        return 2
    core = None
    try:
        client_tls = tls.client_from_args(args)
        bounds = None
        if args.actuator == "kubernetes":
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.ApiClient()
            core = client.CoreV1Api(api)
            actuator = KubeRayActuator(api, args.namespace, args.raycluster,
                                       {"prefill": args.prefill_group, "decode": args.decode_group})
            bounds = {role: (g.min_replicas, g.max_replicas) for role, g in actuator.limits().items()}
        else:
            actuator = RegistryActuator(args.registry, tls.internal_from_args(args))
        mode = "colocated" if set(actuator.observe()) == {"both"} else "disaggregated"
        planner_config = planner_config_from_args(args, mode=mode, limits=bounds)
    except grpc.RpcError as e:
        print(f"tandem autoscaler: --registry {args.registry}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - configuration: say what is wrong, exit
        print(f"tandem autoscaler: {e}", file=sys.stderr)
        return 2
    scheme = "https" if client_tls is not None else "http"

    def routers() -> list[tuple[str, str]]:
        out = []
        for address in args.router:
            host = address.rsplit(":", 1)[0]
            out.append((address, f"{scheme}://{host}:{args.router_http_port}/metrics"))
        if args.router_selector:
            for pod in core.list_namespaced_pod(args.namespace, label_selector=args.router_selector,
                                                _request_timeout=10).items:
                ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
                if ready and pod.status.pod_ip and pod.metadata.deletion_timestamp is None:
                    ip = pod.status.pod_ip
                    out.append((f"{ip}:{args.router_grpc_port}", f"{scheme}://{ip}:{args.router_http_port}/metrics"))
        return out

    scraper = RouterScraper(routers, tls=client_tls, api_key=args.api_key or os.environ.get(API_KEY_ENV))
    metrics = AutoscalerMetrics()
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=metrics.registry)
    autoscaler = Autoscaler(Planner(planner_config), actuator, scraper.collect, args.autoscale_interval_s,
                            mode=mode, metrics=metrics, dry_run=args.dry_run)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    target = (f"RayCluster {args.namespace}/{args.raycluster}" if args.actuator == "kubernetes"
              else f"the controller at {args.registry}")
    logging.getLogger(__name__).info("autoscaler: sizing %s every %.0f s%s", target, args.autoscale_interval_s,
                                     " (dry run)" if args.dry_run else "")
    while not stop.is_set():
        autoscaler.step()
        stop.wait(args.autoscale_interval_s)
    return 0
