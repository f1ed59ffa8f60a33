"""Certificates made in the test run with trustme: a cluster CA, a server certificate for 127.0.0.1/localhost (and
the name `tandem-internal`), a client certificate it signed, and a client certificate from another CA."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

INTERNAL_NAME = "tandem-internal"


@dataclass(frozen=True)
class Certs:
    ca: str  # the CA that signed server and client
    cert: str  # server certificate: IP SAN 127.0.0.1, DNS SANs localhost and tandem-internal
    key: str
    client_cert: str  # signed by `ca`
    client_key: str
    named_cert: str  # only the DNS SAN tandem-internal, no IP SAN: needs a server-name override
    named_key: str
    rogue_ca: str  # another CA
    rogue_cert: str  # a client certificate `rogue_ca` signed
    rogue_key: str


def make_certs(folder: Path) -> Certs:
    import trustme

    ca, rogue = trustme.CA(), trustme.CA()
    paths: dict[str, str] = {}

    def write(name: str, blob) -> None:
        paths[name] = str(folder / f"{name}.pem")
        blob.write_to_path(paths[name])

    for name, issuer, identities in (("", ca, ("127.0.0.1", "localhost", INTERNAL_NAME)),
                                     ("client_", ca, ("client@tandem",)),
                                     ("named_", ca, (INTERNAL_NAME,)),
                                     ("rogue_", rogue, ("rogue@tandem",))):
        issued = issuer.issue_cert(*identities)
        write(f"{name}cert", issued.cert_chain_pems[0])
        write(f"{name}key", issued.private_key_pem)
    write("ca", ca.cert_pem)
    write("rogue_ca", rogue.cert_pem)
    return Certs(**paths)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))
