"""TLS on the router's client fronts, over real sockets against fake workers: gRPC and HTTPS serve clients that trust
the CA; plaintext and untrusting clients are refused and the router keeps serving; with ssl_ca_certs only clients
holding a certificate that CA signed are served (mTLS)."""
from __future__ import annotations

import http.client
import json
import ssl

import grpc
import pytest

from tandem.v1 import generation_pb2_grpc
from tests.router.helpers import LONG_TEXT, Stream, text_request
from tests.tls_certs import certs  # noqa: F401 - fixture

REFUSED = (OSError, http.client.HTTPException)  # ssl.SSLError, a reset or a closed connection, by TLS version


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def credentials(certs, cert: str | None = None, key: str | None = None, ca: str | None = None):
    return grpc.ssl_channel_credentials(root_certificates=read(ca or certs.ca),
                                        private_key=read(key) if key else None,
                                        certificate_chain=read(cert) if cert else None)


def grpc_generate(address: str, creds: grpc.ChannelCredentials | None, max_tokens: int = 8) -> Stream:
    channel = grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    with channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return Stream(list(stub.Generate(text_request(max_tokens=max_tokens), timeout=10)))


def grpc_refused(address: str, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        grpc_generate(address, creds)
    return e.value.code()


def https_completion(address: str, context: ssl.SSLContext | None, max_tokens: int = 10) -> tuple[int, dict]:
    """POST /v1/completions over https with `context` (None: plain http)."""
    host, port = address.rsplit(":", 1)
    conn = (http.client.HTTPSConnection(host, int(port), timeout=10, context=context) if context is not None
            else http.client.HTTPConnection(host, int(port), timeout=10))
    try:
        body = json.dumps({"prompt": LONG_TEXT, "max_tokens": max_tokens, "temperature": 0})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def client_context(certs, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def tls_env(make_env, certs):
    def make(**kw):
        return make_env(http_port=0, ssl_certfile=certs.cert, ssl_keyfile=certs.key, **kw)
    return make


def test_grpc_and_https_fronts_serve_clients_that_trust_the_ca(tls_env, certs, script):
    env = tls_env()
    out = grpc_generate(env.address, credentials(certs))
    assert out.token_ids == script[:8] and out.complete.usage.completion_tokens == 8
    status, body = https_completion(env.router.http_address, client_context(certs))
    assert status == 200, body
    assert body["choices"][0]["text"] == env.model.tokenizer.decode(script[:10], skip_special_tokens=True,
                                                                    clean_up_tokenization_spaces=False)
    assert body["usage"]["completion_tokens"] == 10


def test_plaintext_and_untrusting_clients_are_refused_and_the_router_keeps_serving(tls_env, certs, script):
    env = tls_env()
    assert grpc_refused(env.address, None) == grpc.StatusCode.UNAVAILABLE
    # A TLS client that trusts another CA (not the one that signed the router's certificate).
    assert grpc_refused(env.address, credentials(certs, ca=certs.rogue_ca)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(REFUSED):
        https_completion(env.router.http_address, None)
    with pytest.raises(ssl.SSLCertVerificationError):
        https_completion(env.router.http_address, ssl.create_default_context(cafile=certs.rogue_ca))
    assert grpc_generate(env.address, credentials(certs)).token_ids == script[:8]
    assert https_completion(env.router.http_address, client_context(certs))[0] == 200


def test_mtls_serves_only_clients_with_a_certificate_the_client_ca_signed(tls_env, certs, script):
    env = tls_env(ssl_ca_certs=certs.ca)
    assert env.router.config.ssl.requires_client_cert
    # No client certificate, and one from another CA: refused on both fronts.
    assert grpc_refused(env.address, credentials(certs)) == grpc.StatusCode.UNAVAILABLE
    assert grpc_refused(env.address, credentials(certs, certs.rogue_cert, certs.rogue_key)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(REFUSED):
        https_completion(env.router.http_address, client_context(certs))
    with pytest.raises(REFUSED):
        https_completion(env.router.http_address, client_context(certs, certs.rogue_cert, certs.rogue_key))
    # With the client certificate: served.
    out = grpc_generate(env.address, credentials(certs, certs.client_cert, certs.client_key))
    assert out.token_ids == script[:8]
    status, body = https_completion(env.router.http_address, client_context(certs, certs.client_cert, certs.client_key))
    assert status == 200 and body["usage"]["completion_tokens"] == 10


def test_cert_reqs_0_serves_clients_without_a_certificate(tls_env, certs, script):
    env = tls_env(ssl_ca_certs=certs.ca, ssl_cert_reqs=ssl.CERT_NONE)
    assert grpc_generate(env.address, credentials(certs)).token_ids == script[:8]
    assert https_completion(env.router.http_address, client_context(certs))[0] == 200


def test_loadtest_driver_runs_against_an_mtls_router(tls_env, certs, script):
    """`tandem loadtest --ca-certs --certfile --keyfile`: the driver's channel presents the client certificate."""
    import asyncio

    from loadtest.client import LoadDriver
    from loadtest.prompts import RequestSpec
    from tandem.tls import TLSConfig

    env = tls_env(ssl_ca_certs=certs.ca)
    prompt = tuple(env.model.encode_text(LONG_TEXT))
    specs = [RequestSpec(index=i, kind="default", prompt_ids=prompt, max_tokens=6, arrival_s=0.0) for i in range(2)]
    driver = LoadDriver(env.address, model=None, timeout_s=10,
                        tls=TLSConfig(certs.client_cert, certs.client_key, certs.ca))
    load = asyncio.run(driver.run_open_loop(specs))
    assert [(r.status, r.output_tokens) for r in load.records] == [("OK", 6), ("OK", 6)]
    without_cert = LoadDriver(env.address, model=None, timeout_s=10, tls=TLSConfig(ca_certs=certs.ca))
    with pytest.raises(ConnectionError, match="no gRPC server answered.*over TLS: check --ca-certs"):
        asyncio.run(without_cert.run_open_loop(specs, connect_timeout_s=2))
