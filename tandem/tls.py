"""TLS for every socket tandem opens: the client fronts (gRPC and HTTP) and the cluster's internal traffic.

One frozen `TLSConfig` names PEM files, checks them when it is built (each file exists and parses, the key belongs
to the certificate; an error names the option), and builds what each library wants: gRPC server and channel
credentials, and `ssl.SSLContext`s for aiohttp's TCPSite and for the raw KV-transfer sockets.

Two uses, two sets of option names:

- The client fronts (`TLSConfig.front`): `ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`, `ssl_cert_reqs`, as vLLM's
  HTTP server (uvicorn) names them. With `ssl_ca_certs`, clients must present a certificate signed by it (mTLS)
  unless `ssl_cert_reqs` says otherwise.
- Internal traffic (`TLSConfig.internal`): router→registry, router→worker, controller→worker and worker→worker KV
  transfer. Always mutual: `internal_tls_certfile` / `internal_tls_keyfile` are what every component presents
  (as a server and as a client), `internal_tls_ca_certs` the cluster CA that signed them all. Components are dialled
  by IP address, so the certificate needs an IP SAN for each address a component listens on, or a DNS SAN that
  `internal_tls_server_name` names (then every client verifies the server against that name, whatever the address).
"""
from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

# ssl_cert_reqs values (the stdlib ssl module's, as vLLM takes them). gRPC has no "optional" client certificate.
CERT_REQS = {int(ssl.CERT_NONE): "CERT_NONE", int(ssl.CERT_REQUIRED): "CERT_REQUIRED"}


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for one side or both sides of a TLS connection.

    certfile/keyfile: this side's certificate chain and its unencrypted private key (a server always has them; a
        client only for mTLS). ca_certs: the CA bundle that verifies the peer (clients: the server; servers: client
        certificates); a client without it trusts the system's CAs.
    cert_reqs: server side, ssl.CERT_NONE (0) or ssl.CERT_REQUIRED (2); None: CERT_REQUIRED when ca_certs is set.
    server_name: client side, the name the server's certificate must hold, instead of the host dialled.
    option_prefix: how errors name the options ("ssl_" → "ssl_certfile: ...").
    """

    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    cert_reqs: int | None = None
    server_name: str | None = None
    option_prefix: str = ""

    def __post_init__(self):
        for name in ("certfile", "keyfile", "ca_certs"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{self._name(name)}: no such file {path!r}")
        if (self.certfile is None) != (self.keyfile is None):
            given, missing = ("certfile", "keyfile") if self.keyfile is None else ("keyfile", "certfile")
            raise ValueError(f"{self._name(missing)}: required with {self._name(given)}")
        if self.cert_reqs is not None and self.cert_reqs not in CERT_REQS:
            allowed = ", ".join(f"{k} ({v})" for k, v in CERT_REQS.items())
            raise ValueError(f"{self._name('cert_reqs')}: must be one of {allowed}, got {self.cert_reqs!r}")
        if self.cert_reqs == ssl.CERT_REQUIRED and self.ca_certs is None:
            raise ValueError(f"{self._name('cert_reqs')}: {ssl.CERT_REQUIRED} (CERT_REQUIRED) needs "
                             f"{self._name('ca_certs')}, the CA that signs client certificates")
        if self.server_name is not None and not self.server_name:
            raise ValueError(f"{self._name('server_name')}: must be a host name, got ''")
        if self.certfile is not None:
            self._check_cert_chain()
        if self.ca_certs is not None:
            try:
                ssl.create_default_context(cafile=self.ca_certs)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"{self._name('ca_certs')}: {self.ca_certs!r} holds no usable PEM CA "
                                 f"certificate: {e}") from None

    @classmethod
    def front(cls, certfile: str | None = None, keyfile: str | None = None, ca_certs: str | None = None,
              cert_reqs: int | None = None) -> TLSConfig | None:
        """A client-facing server's TLS from vLLM's `--ssl-*` options; None when none is given (plaintext)."""
        if certfile is None and keyfile is None and ca_certs is None and cert_reqs is None:
            return None
        config = cls(certfile, keyfile, ca_certs, cert_reqs, option_prefix="ssl_")
        if certfile is None:
            raise ValueError("ssl_certfile: required to serve TLS (with ssl_keyfile)")
        return config

    @classmethod
    def internal(cls, certfile: str | None = None, keyfile: str | None = None, ca_certs: str | None = None,
                 server_name: str | None = None) -> TLSConfig | None:
        """The cluster's mutual TLS; None when no option is given. All three files are required together."""
        if certfile is None and keyfile is None and ca_certs is None and server_name is None:
            return None
        config = cls(certfile, keyfile, ca_certs, ssl.CERT_REQUIRED if ca_certs else None, server_name,
                     option_prefix="internal_tls_")
        for name in ("certfile", "keyfile", "ca_certs"):
            if getattr(config, name) is None:
                raise ValueError(f"{config._name(name)}: required for internal mutual TLS (every component "
                                 "presents internal_tls_certfile and verifies its peers with internal_tls_ca_certs)")
        return config

    @property
    def requires_client_cert(self) -> bool:
        return self.cert_reqs == ssl.CERT_REQUIRED or (self.cert_reqs is None and self.ca_certs is not None)

    # --- gRPC -----------------------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        self._need_cert("a TLS server")
        client_auth = self.requires_client_cert
        return grpc.ssl_server_credentials(
            [(_read(self.keyfile), _read(self.certfile))],
            root_certificates=_read(self.ca_certs) if client_auth else None, require_client_auth=client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_certs) if self.ca_certs else None,
            private_key=_read(self.keyfile) if self.keyfile else None,
            certificate_chain=_read(self.certfile) if self.certfile else None)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    # --- ssl module (aiohttp, raw sockets) ------------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        self._need_cert("a TLS server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certfile, self.keyfile)
        if self.ca_certs is not None:
            context.load_verify_locations(cafile=self.ca_certs)
        context.verify_mode = ssl.CERT_REQUIRED if self.requires_client_cert else ssl.CERT_NONE
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """Verifies the server (hostname included: pass `server_hostname(host)` to wrap_socket)."""
        context = ssl.create_default_context(cafile=self.ca_certs)
        if self.certfile is not None:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context

    def server_hostname(self, host: str) -> str:
        """The name a client checks the server's certificate against when it dials `host`."""
        return self.server_name or host.strip("[]")

    # --- helpers --------------------------------------------------------------------------------------------

    def _name(self, field_name: str) -> str:
        return f"{self.option_prefix}{field_name}"

    def _need_cert(self, what: str) -> None:
        if self.certfile is None:
            raise ValueError(f"{self._name('certfile')}: {what} needs a certificate and key")

    def _check_cert_chain(self) -> None:
        certfile, keyfile = self._name("certfile"), self._name("keyfile")
        if b"-----BEGIN CERTIFICATE-----" not in _read(self.certfile):
            raise ValueError(f"{certfile}: {self.certfile!r} holds no PEM certificate")
        if b"PRIVATE KEY-----" not in _read(self.keyfile):
            raise ValueError(f"{keyfile}: {self.keyfile!r} holds no PEM private key")

        def no_password():  # OpenSSL would otherwise prompt on the terminal
            raise ValueError(f"{keyfile}: {self.keyfile!r} is encrypted; give an unencrypted key (gRPC needs one)")

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.certfile, self.keyfile, password=no_password)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"{keyfile}: {self.keyfile!r} is not the private key of {certfile} "
                                 f"{self.certfile!r}") from None
            raise ValueError(f"{certfile}/{keyfile}: cannot load {self.certfile!r} with {self.keyfile!r}: {e}") from None


def add_port(server, address: str, tls: TLSConfig | None) -> int:
    """`server.add_secure_port` with `tls`'s credentials, or add_insecure_port when `tls` is None (grpc or grpc.aio
    servers); returns the port bound (0: none)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def channel(target: str, tls: TLSConfig | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A blocking gRPC channel to `target`: TLS (mutual when `tls` has a certificate) or plaintext when None."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def aio_channel(target: str, tls: TLSConfig | None, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """`channel` for grpc.aio."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- command-line options (tandem up, and the clients: generate, status, loadtest) ---------------------------

def add_server_arguments(p) -> None:
    """`tandem up`'s TLS options: vLLM's --ssl-* for the client fronts, --internal-tls-* for the cluster."""
    g = p.add_argument_group("TLS", "client fronts (gRPC and HTTP ports): vLLM's --ssl-* options; cluster traffic "
                                    "(registry, workers, KV transfer): mutual TLS with --internal-tls-*")
    g.add_argument("--ssl-certfile", default=None, help="PEM certificate (chain) the router's fronts serve")
    g.add_argument("--ssl-keyfile", default=None, help="its unencrypted PEM private key")
    g.add_argument("--ssl-ca-certs", default=None, help="CA bundle for client certificates: clients must present "
                                                        "one it signed (mTLS) unless --ssl-cert-reqs 0")
    g.add_argument("--ssl-cert-reqs", type=int, default=None, choices=sorted(CERT_REQS),
                   help="0: no client certificate, 2: required (default: 2 with --ssl-ca-certs, else 0)")
    g.add_argument("--internal-tls-certfile", default=None,
                   help="PEM certificate every component presents; needs IP SANs for the addresses components "
                        "listen on, or a DNS SAN named by --internal-tls-server-name")
    g.add_argument("--internal-tls-keyfile", default=None, help="its unencrypted PEM private key")
    g.add_argument("--internal-tls-ca-certs", default=None, help="the cluster CA that signed every component's cert")
    g.add_argument("--internal-tls-server-name", default=None,
                   help="verify every component's certificate against this name instead of its IP address")


def front_from_args(args) -> TLSConfig | None:
    return TLSConfig.front(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs, args.ssl_cert_reqs)


def internal_from_args(args) -> TLSConfig | None:
    return TLSConfig.internal(args.internal_tls_certfile, args.internal_tls_keyfile, args.internal_tls_ca_certs,
                              args.internal_tls_server_name)


def add_client_arguments(p) -> None:
    """A client's options for a router that serves TLS (`--tls`, implied by the others)."""
    g = p.add_argument_group("TLS", "for a router started with --ssl-certfile")
    g.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    g.add_argument("--ca-certs", default=None, help="CA bundle that verifies the router's certificate (implies --tls)")
    g.add_argument("--certfile", default=None, help="client certificate, for a router that requires one (mTLS)")
    g.add_argument("--keyfile", default=None, help="its unencrypted PEM private key")


def client_from_args(args) -> TLSConfig | None:
    """The client TLS the options ask for; None: plaintext. ValueError naming the option for a bad file."""
    if not (args.tls or args.ca_certs or args.certfile or args.keyfile):
        return None
    return TLSConfig(args.certfile, args.keyfile, args.ca_certs)
