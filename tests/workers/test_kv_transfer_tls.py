"""KV transfer with mutual TLS (workers' internal_tls): between two processes a payload crosses bit for bit over
tcp, shm and nixl (whose header and ack go over tcp); a receiver without the cluster's certificate, or one that does not
trust the sender's, gets a prompt KVTransferError and the payload stays staged for a receiver that may have it."""
from __future__ import annotations

import pytest

from tandem.tls import TLSConfig
from tests.tls_certs import INTERNAL_NAME, certs  # noqa: F401 - fixture
from tests.workers.test_kv_transfer import TRANSPORTS, Sender, assert_same_payload, landing_device, make_payload
from workers.kv_transfer import KVTransferError, make_kv_transport


def cluster_tls(certs, **kw) -> TLSConfig:
    return TLSConfig.internal(certs.cert, certs.key, certs.ca, **kw)


@pytest.fixture(scope="module", params=TRANSPORTS)
def tls_sender(request, certs):
    handle = Sender(request.param, tls=cluster_tls(certs))
    yield handle
    if handle.process.is_alive():
        handle.stop()


def fetch_with(name: str, tls: TLSConfig | None, endpoint: str, transfer_id: str):
    receiver = make_kv_transport(name, tls=tls)
    try:
        return receiver.fetch(endpoint, transfer_id, timeout_s=10)
    finally:
        receiver.close()


def test_round_trips_are_bit_exact_over_mutual_tls(tls_sender, certs):
    receiver = make_kv_transport(tls_sender.name, tls=cluster_tls(certs))
    try:
        for transfer_id in ("tls-1", "tls-2"):  # the second one reuses the pooled TLS connection
            want = tls_sender.offer(transfer_id, "bfloat16")
            got = receiver.fetch(tls_sender.endpoint, transfer_id, timeout_s=10)
            assert_same_payload(got, want, landing_device(tls_sender.name))
            assert tls_sender.fetched.get(timeout=5) == transfer_id
    finally:
        receiver.close()


def test_receivers_without_the_cluster_certificate_are_refused_and_the_payload_stays(tls_sender, certs):
    want = tls_sender.offer("guarded")
    name, endpoint = tls_sender.name, tls_sender.endpoint
    with pytest.raises(KVTransferError, match=f"fetch of transfer 'guarded' from {endpoint}"):
        fetch_with(name, None, endpoint, "guarded")  # plaintext
    with pytest.raises(KVTransferError):  # a certificate from another CA
        fetch_with(name, TLSConfig(certs.rogue_cert, certs.rogue_key, certs.ca), endpoint, "guarded")
    with pytest.raises(KVTransferError, match="certificate verify failed"):  # does not trust the sender
        fetch_with(name, TLSConfig.internal(certs.client_cert, certs.client_key, certs.rogue_ca), endpoint, "guarded")
    assert tls_sender.fetched.empty()
    assert_same_payload(fetch_with(name, cluster_tls(certs), endpoint, "guarded"), want, landing_device(name))
    assert tls_sender.fetched.get(timeout=5) == "guarded"


def test_a_certificate_without_ip_sans_needs_the_server_name(certs):
    """Workers are dialled by IP: a certificate that only names `tandem-internal` verifies once clients are told
    to expect that name (internal_tls_server_name)."""
    sender = make_kv_transport("tcp", tls=TLSConfig.internal(certs.named_cert, certs.named_key, certs.ca))
    endpoint = sender.start("127.0.0.1")
    try:
        sender.offer("named", make_payload("named"))
        with pytest.raises(KVTransferError, match="certificate verify failed"):
            fetch_with("tcp", cluster_tls(certs), endpoint, "named")
        got = fetch_with("tcp", cluster_tls(certs, server_name=INTERNAL_NAME), endpoint, "named")
        assert_same_payload(got, make_payload("named"))
    finally:
        sender.close()
