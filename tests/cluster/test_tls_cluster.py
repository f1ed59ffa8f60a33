"""A whole cluster with TLS, as a user runs it: `tandem up` with mTLS on the router's fronts (--ssl-*) and mutual
TLS inside (--internal-tls-*: registry, router→worker, KV over tcp). Clients with the right certificates are served
on gRPC and HTTPS, with the KV handed off over TLS; clients without them, and callers of a worker's port that lack
the cluster certificate, are refused."""
from __future__ import annotations

import http.client
import json
import signal
import ssl
import subprocess

import grpc
import pytest

from tandem import tls
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from tests.cluster.tandem_up import TandemUp, free_port, tandem
from tests.tls_certs import certs  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def test_tandem_up_with_mtls_outside_and_inside(certs):
    port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    up = TandemUp([
        "--port", str(port), "--http-port", str(http_port), "--kv-transport", "tcp",
        "--max-local-prefill-length", "0", "--kv-cache-memory-bytes", str(128 << 20),
        "--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key, "--ssl-ca-certs", certs.ca,
        "--internal-tls-certfile", certs.cert, "--internal-tls-keyfile", certs.key, "--internal-tls-ca-certs", certs.ca,
    ])
    try:
        assert f"https://127.0.0.1:{http_port}/v1" in up.banner
        client = ["--address", address, "--ca-certs", certs.ca]
        out = tandem("generate", "The capital of France is", "--max-tokens", "8", *client,
                     "--certfile", certs.client_cert, "--keyfile", certs.client_key)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() and "completion 8 tokens" in out.stderr

        refused = tandem("generate", "hi", "--timeout", "10", *client)  # no client certificate
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr

        context = ssl.create_default_context(cafile=certs.ca)
        context.load_cert_chain(certs.client_cert, certs.client_key)
        conn = http.client.HTTPSConnection("127.0.0.1", http_port, timeout=60, context=context)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hello", "max_tokens": 4}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 4
        conn.close()

        client_tls = tls.TLSConfig(certs.client_cert, certs.client_key, certs.ca)
        with tls.channel(address, client_tls) as channel:
            status = worker_pb2_grpc.ClusterStub(channel).GetStatus(wpb.GetStatusRequest(), timeout=10)
        # Both requests were disaggregated: their KV went from the prefill to the decode worker over TLS.
        assert sum(w.kv_transfers for w in status.workers) >= 2
        # A worker's own port wants the cluster certificate: plaintext and certificate-less callers are refused.
        worker_address = status.workers[0].info.address
        for caller in (None, tls.TLSConfig(ca_certs=certs.ca)):
            with tls.channel(worker_address, caller) as channel, pytest.raises(grpc.RpcError) as e:
                worker_pb2_grpc.WorkerStub(channel).GetStats(wpb.GetStatsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls.channel(worker_address, tls.TLSConfig.internal(certs.cert, certs.key, certs.ca)) as channel:
            assert worker_pb2_grpc.WorkerStub(channel).GetStats(wpb.GetStatsRequest(), timeout=10).num_blocks > 0
    finally:
        up.proc.send_signal(signal.SIGTERM)
        try:
            up.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
    assert up.proc.returncode == 0, up.output()
