"""`tandem controller`: the cluster controller alone (no router), for Kubernetes: on the head pod of a KubeRay
RayCluster it joins Ray, serves the registry to the routers in other pods and sizes the pools from the worker
groups (`--pool-resources --follow-nodes`), until SIGINT or SIGTERM.

`tandem drain` asks a controller's registry to drain workers (DrainWorker), for a worker pod's preStop hook.

Also the options `tandem up` shares with it: pools, engine, Ray, Redis, resources (`add_cluster_arguments`,
`cluster_config`)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from tandem import tls
from tandem.redis_store import StoreConfig
from workers.config import ATTENTION_BACKENDS

DEFAULT_REGISTRY_PORT = 50100
# tls.add_server_arguments' options for the client fronts: the router's, not the controller's.
_FRONT_TLS = ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "ssl_cert_reqs")


def add_cluster_arguments(p: argparse.ArgumentParser, redis_help: str, redis_required: bool = False) -> None:
    """The pool, engine, Ray, Redis and resource options of `tandem up` and `tandem controller`."""
    p.add_argument("--model", default=None, help="model path or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--mode", default="disaggregated", choices=("disaggregated", "colocated"))
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="number of 'both' workers in colocated mode")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks per worker (one Ray actor each), both pools")
    p.add_argument("--prefill-tensor-parallel-size", type=int, default=None, help="the prefill pool's, if it differs")
    p.add_argument("--decode-tensor-parallel-size", type=int, default=None,
                   help="the decode (or colocated) pool's, if it differs")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' or host:port) instead of starting one")
    p.add_argument("--kv-transport", default="auto",
                   help="KV transfer transport: shm (one host), tcp, nixl, cuda_ipc (one node, GPU to GPU; workers "
                        "must see each other's GPUs), or auto: shm for a local Ray, tcp when joining one")
    p.add_argument("--redis-url", default=None, required=redis_required, help=redis_help)
    p.add_argument("--kv-offload", choices=("auto", "on", "off"), default="auto",
                   help="remote KV tier in Redis: workers offload evicted prefix blocks and pull them back when that "
                        "beats recomputing (auto: on for CPU workers; default %(default)s)")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=None,
                   help="workers' scheduling; default priority when a tenant has a priority, else fcfs")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, "
                   "bounded by the KV cache)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="split long prompts across steps (default on); off, max-num-batched-tokens must hold "
                        "the longest prompt")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None,
                   help="workers' attention kernels: triton (CUDA; on CPU only in Triton's interpreter, for tests), sdpa "
                        "(portable), auto (default): triton on CUDA, sdpa on CPU")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="CUDA workers: run every step eagerly, with no CUDA graphs")
    p.add_argument("--cudagraph-capture-sizes", type=_int_list, default=None,
                   help="CUDA workers: decode batch sizes captured as CUDA graphs, e.g. 1,2,4,8 (default: 1, 2, 4, "
                        "8, 16, 24, ... up to max-num-seqs)")
    p.add_argument("--num-cpus-per-worker", type=float, default=1)
    p.add_argument("--num-gpus-per-worker", type=float, default=0)
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per CPU worker (default: its CPUs)")
    p.add_argument("--log-level", default="INFO")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers such as 1,2,4,8, got {text!r}") from None


def _or(value, default):
    return default if value is None else value


def cluster_config(args, internal_tls, scheduling_policy: str | None = None, **options):
    """The ClusterConfig the options describe (ValueError naming a bad one); `options` add ClusterConfig fields."""
    from cluster.config import ClusterConfig  # imports ray: only for the commands that run a cluster

    engine_options = (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs),
                      ("max_num_batched_tokens", args.max_num_batched_tokens),
                      ("kv_cache_memory_bytes", args.kv_cache_memory_bytes),
                      ("enable_chunked_prefill", args.enable_chunked_prefill),
                      ("scheduling_policy", args.scheduling_policy or scheduling_policy),
                      ("attention_backend", args.attention_backend), ("enforce_eager", args.enforce_eager),
                      ("cudagraph_capture_sizes", args.cudagraph_capture_sizes))
    engine = {k: v for k, v in engine_options if v is not None}
    if args.num_gpus_per_worker:
        engine["device"] = "cuda"
    return ClusterConfig(
        model=args.model, mode=args.mode, num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers, num_colocated_workers=args.workers,
        prefill_tensor_parallel_size=_or(args.prefill_tensor_parallel_size, args.tensor_parallel_size),
        decode_tensor_parallel_size=_or(args.decode_tensor_parallel_size, args.tensor_parallel_size),
        engine=engine, kv_transport=args.kv_transport, ray_address=args.ray_address,
        num_cpus_per_rank=args.num_cpus_per_worker, num_gpus_per_rank=args.num_gpus_per_worker,
        torch_threads=args.torch_threads, internal_tls=internal_tls, redis_url=args.redis_url,
        kv_offload=args.kv_offload, **options,
    )


# --- tandem controller ----------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("controller", help="run only the cluster controller (Ray workers + registry), e.g. on a "
                                          "KubeRay head pod; routers run apart", description=__doc__)
    add_cluster_arguments(p, redis_required=True,
                          redis_help="redis:// or rediss:// URL of the Redis (or Valkey) every worker and router uses "
                                     "(required: no embedded Redis here)")
    k = p.add_argument_group("controller")
    k.add_argument("--registry-host", default="0.0.0.0",
                   help="where the registry (tandem.v1.Registry) listens (default %(default)s: routers in other pods "
                        "reach it, through a Service)")
    k.add_argument("--registry-port", type=int, default=DEFAULT_REGISTRY_PORT, help="(default %(default)s)")
    k.add_argument("--pool-resources", action="store_true",
                   help="each worker also asks Ray for 1 of the resource tandem_<role> (tandem_prefill, "
                        "tandem_decode, tandem_both), so that exactly one lands on each node offering 1: a KubeRay "
                        "worker group's pods, with rayStartParams resources: '\"{\\\"tandem_decode\\\": 1}\"'")
    k.add_argument("--follow-nodes", action="store_true",
                   help="size each pool to the alive Ray nodes offering tandem_<role> (the sum of that resource), "
                        "checked every second; --prefill-workers/--decode-workers/--workers are then ignored. "
                        "Patching a RayCluster worker group's replicas resizes its pool; a worker whose node left "
                        "is not replaced elsewhere")
    k.add_argument("--drain-timeout-s", type=float, default=60.0,
                   help="a worker leaving its pool finishes its requests for at most this long; then the routers "
                        "move what is left (default %(default)s)")
    tls.add_server_arguments(p)
    for name in _FRONT_TLS:  # refused by run(): not in the help
        p._option_string_actions["--" + name.replace("_", "-")].help = argparse.SUPPRESS


def add_drain_parser(sub) -> None:
    p = sub.add_parser("drain", help="drain workers through a controller's registry: they take no new requests, "
                                     "finish theirs, stop, and their pool shrinks by one (a worker pod's preStop hook)",
                       description="Exit status: 0 drained, or no worker on --node-ip; 1 the registry refused, "
                                   "failed, or has no worker --worker-id; 2 bad options.")
    p.add_argument("--registry", required=True, help="the controller's registry host:port")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--worker-id", default="", help="the worker to drain")
    target.add_argument("--node-ip", default="", help="drain every worker on this node (a pod's IP: $POD_IP)")
    p.add_argument("--no-wait", action="store_true", help="return when draining starts, not when they have stopped")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="give up waiting after this long (default %(default)s; keep it above the controller's "
                        "--drain-timeout-s)")
    tls.add_server_arguments(p)  # the --internal-tls-* ones: the registry asks for the cluster's certificate
    for name in _FRONT_TLS:
        p._option_string_actions["--" + name.replace("_", "-")].help = argparse.SUPPRESS


def run_drain(args) -> int:
    """0 when drained (or when no worker runs on --node-ip: a pod without one); 1 when the registry refused or failed,
    or knows no --worker-id."""
    import grpc

    from tandem.v1 import worker_pb2 as wpb
    from tandem.v1 import worker_pb2_grpc

    try:
        internal_tls = tls.internal_from_args(args)
    except ValueError as e:
        print(f"tandem drain: {e}", file=sys.stderr)
        return 2
    request = wpb.DrainWorkerRequest(wait=not args.no_wait)
    if args.worker_id:
        request.worker_id = args.worker_id
    else:
        request.node_ip = args.node_ip
    with tls.channel(args.registry, internal_tls) as channel:
        try:
            resp = worker_pb2_grpc.RegistryStub(channel).DrainWorker(request, timeout=args.timeout_s)
        except grpc.RpcError as e:
            print(f"tandem drain: {args.registry}: {e.code().name}: {e.details()}", file=sys.stderr)
            # No worker on a pod's node (a preStop hook on a pod whose worker never started): nothing to do. An
            # unknown --worker-id is more likely a typo: an error.
            return 0 if e.code() == grpc.StatusCode.NOT_FOUND and args.node_ip else 1
    print(f"tandem drain: {'drained' if request.wait else 'draining'} {', '.join(resp.worker_ids)}", flush=True)
    return 0


def run(args) -> int:
    try:
        for name in _FRONT_TLS:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')}: the controller serves no client front; give it to "
                                 "the routers")
        internal_tls = tls.internal_from_args(args)
        StoreConfig(args.redis_url)
        config = cluster_config(args, internal_tls, registry_host=args.registry_host, registry_port=args.registry_port,
                                pool_resources=args.pool_resources, follow_nodes=args.follow_nodes,
                                drain_timeout_s=args.drain_timeout_s)
    except ValueError as e:
        print(f"tandem controller: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config)


def serve(config) -> int:
    """Run the controller until SIGINT or SIGTERM, then stop its workers."""
    from cluster.controller import Controller

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    controller = Controller(config)
    try:
        registry = controller.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Again: ray.init() put Ray's C++ failure handler (a stack dump on SIGTERM) in front of ours.
            signal.signal(sig, on_signal)
        pools = ", ".join(f"{role} {p.desired}" for role, p in controller.pool_status().items())
        print(f"tandem controller: registry at {registry} (tandem.v1.Registry); pools: {pools}"
              f"{' (following the Ray nodes)' if config.follow_nodes else ''}. SIGTERM stops.", flush=True)
        while not stop.wait(1.0):
            pass
        print("tandem controller: stopping", flush=True)
    finally:
        controller.stop()
    print("tandem controller: stopped", flush=True)
    return 0
