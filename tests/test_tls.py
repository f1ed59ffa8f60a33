"""TLS options are checked at start-up: a missing file, a file that is not PEM, a key that is not the certificate's,
or an incomplete set gives an error that names the option, from TLSConfig, RouterConfig and `tandem up`."""
from __future__ import annotations

import ssl

import pytest

from router.config import RouterConfig
from tandem.tls import TLSConfig
from tests.tls_certs import certs  # noqa: F401 - fixture

REGISTRY = "127.0.0.1:1"


def test_front_options_are_vllms_and_mtls_follows_the_client_ca(certs):
    assert TLSConfig.front() is None
    plain = RouterConfig(registry_address=REGISTRY, ssl_certfile=certs.cert, ssl_keyfile=certs.key)
    assert plain.ssl.certfile == certs.cert and not plain.ssl.requires_client_cert
    mutual = RouterConfig(registry_address=REGISTRY, ssl_certfile=certs.cert, ssl_keyfile=certs.key,
                          ssl_ca_certs=certs.ca)
    assert mutual.ssl.requires_client_cert
    assert mutual.ssl.server_ssl_context().verify_mode == ssl.CERT_REQUIRED
    optional = TLSConfig.front(certs.cert, certs.key, certs.ca, cert_reqs=0)
    assert not optional.requires_client_cert and optional.server_ssl_context().verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("options, message", [
    (dict(ssl_certfile="/nonexistent/cert.pem", ssl_keyfile="KEY"), "ssl_certfile: no such file '/nonexistent/cert.pem'"),
    (dict(ssl_certfile="CERT", ssl_keyfile="/nonexistent/key.pem"), "ssl_keyfile: no such file"),
    (dict(ssl_certfile="CERT"), "ssl_keyfile: required with ssl_certfile"),
    (dict(ssl_keyfile="KEY"), "ssl_certfile: required with ssl_keyfile"),
    (dict(ssl_ca_certs="CA"), "ssl_certfile: required to serve TLS"),
    (dict(ssl_certfile="CERT", ssl_keyfile="OTHER_KEY"), "ssl_keyfile: '{OTHER_KEY}' is not the private key of ssl_certfile"),
    (dict(ssl_certfile="KEY", ssl_keyfile="KEY"), "ssl_certfile: '{KEY}' holds no PEM certificate"),
    (dict(ssl_certfile="CERT", ssl_keyfile="CERT"), "ssl_keyfile: '{CERT}' holds no PEM private key"),
    (dict(ssl_certfile="CERT", ssl_keyfile="KEY", ssl_ca_certs="KEY"), "ssl_ca_certs: '{KEY}' holds no usable PEM CA"),
    (dict(ssl_certfile="CERT", ssl_keyfile="KEY", ssl_cert_reqs=1), "ssl_cert_reqs: must be one of 0 (CERT_NONE), 2"),
    (dict(ssl_certfile="CERT", ssl_keyfile="KEY", ssl_cert_reqs=2), "ssl_cert_reqs: 2 (CERT_REQUIRED) needs ssl_ca_certs"),
])
def test_bad_front_options_name_the_option(certs, tmp_path, options, message):
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(open(certs.client_key, "rb").read())  # a valid key, of another certificate
    files = {"CERT": certs.cert, "KEY": certs.key, "CA": certs.ca, "OTHER_KEY": str(other_key)}
    options = {k: files.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError) as e:
        RouterConfig(registry_address=REGISTRY, **options)
    assert message.format(**files) in str(e.value)


def test_internal_tls_needs_certificate_key_and_cluster_ca(certs):
    assert TLSConfig.internal() is None
    tls = TLSConfig.internal(certs.cert, certs.key, certs.ca)
    assert tls.requires_client_cert and tls.server_hostname("127.0.0.1") == "127.0.0.1"
    assert TLSConfig.internal(certs.cert, certs.key, certs.ca, "tandem-internal").server_hostname("10.0.0.7") == \
        "tandem-internal"
    with pytest.raises(ValueError, match="internal_tls_ca_certs: required for internal mutual TLS"):
        TLSConfig.internal(certs.cert, certs.key)
    with pytest.raises(ValueError, match="internal_tls_certfile: required with internal_tls_keyfile"):
        TLSConfig.internal(keyfile=certs.key, ca_certs=certs.ca)
    with pytest.raises(ValueError, match="internal_tls_certfile: no such file"):
        TLSConfig.internal("/nonexistent.pem", certs.key, certs.ca)


def test_tandem_up_refuses_bad_tls_options_before_starting_anything(certs, capsys):
    from cluster.cli import main

    assert main(["up", "--ssl-certfile", certs.cert, "--ssl-keyfile", certs.client_key]) == 2
    assert "tandem up: ssl_keyfile:" in capsys.readouterr().err
    assert main(["up", "--internal-tls-certfile", certs.cert, "--internal-tls-keyfile", certs.key]) == 2
    assert "tandem up: internal_tls_ca_certs: required" in capsys.readouterr().err


def test_clients_refuse_a_missing_ca_file_by_name(capsys):
    from cluster.cli import main

    assert main(["status", "--address", "127.0.0.1:1", "--ca-certs", "/nonexistent/ca.pem"]) == 2
    assert "tandem status: ca_certs: no such file '/nonexistent/ca.pem'" in capsys.readouterr().err


def test_registry_serves_mutual_tls_and_the_server_name_stands_in_for_ip_sans(certs):
    """A certificate that names only `tandem-internal` (no IP SAN) is accepted once clients expect that name."""
    import grpc

    from cluster.registry import WorkerRegistry
    from tandem import tls
    from tandem.v1 import worker_pb2 as wpb
    from tandem.v1 import worker_pb2_grpc
    from tests.tls_certs import INTERNAL_NAME

    registry = WorkerRegistry()
    address = registry.serve("127.0.0.1", 0, TLSConfig.internal(certs.named_cert, certs.named_key, certs.ca))
    registry.add(wpb.WorkerInfo(worker_id="w1", role="decode", address="127.0.0.1:1"))

    def list_workers(client: TLSConfig | None):
        with tls.channel(address, client) as channel:
            return worker_pb2_grpc.RegistryStub(channel).ListWorkers(wpb.ListWorkersRequest(), timeout=10)

    try:
        named = TLSConfig.internal(certs.cert, certs.key, certs.ca, server_name=INTERNAL_NAME)
        assert [w.worker_id for w in list_workers(named).workers] == ["w1"]
        for refused in (TLSConfig.internal(certs.cert, certs.key, certs.ca),  # checks the IP: no IP SAN
                        TLSConfig(ca_certs=certs.ca, server_name=INTERNAL_NAME),  # no client certificate
                        None):  # plaintext
            with pytest.raises(grpc.RpcError) as e:
                list_workers(refused)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        registry.stop()
