"""API keys and tenants: who a request is from, and what that tenant may do.

Keys come from a YAML (or JSON) document, read from a file (`--api-key-file`, e.g. a mounted Kubernetes Secret) or
the TANDEM_API_KEYS environment variable, plus vLLM's single `--api-key` / VLLM_API_KEY as the tenant "default":

    tenants:
      team-a:
        api_keys: ["sk-team-a-1", "sk-team-a-2"]
        requests_per_second: 10     # token bucket, burst of one second's worth (at least 1); absent: no limit
        tokens_per_minute: 200000   # prompt + max_tokens reserved at admission, the unused part refunded at the end
        priority: 0                 # lower is served first (vLLM's convention); the tenant's requests get it
      batch:
        api_keys: ["sk-batch"]
        priority: 10

Only SHA-256 digests of the keys are kept, compared in constant time; no key is ever logged or put in a message.
A request's key travels as gRPC metadata `authorization: Bearer <key>` or HTTP `Authorization: Bearer <key>`.
Missing or unknown key: UNAUTHENTICATED / 401. A known tenant asking for a priority more urgent than its own:
PERMISSION_DENIED / 403. With no keys configured auth is off, which is allowed only on a loopback host unless
`disable_auth` says so explicitly.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import yaml

from router.errors import RouterError

# Environment variables, read here only (tenancy_from_sources).
API_KEYS_ENV = "TANDEM_API_KEYS"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
# The tenant of vLLM's single --api-key, and of every request when auth is off.
DEFAULT_TENANT = "default"
TENANT_FIELDS = ("api_keys", "requests_per_second", "tokens_per_minute", "priority")


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Tenant:
    name: str
    # SHA-256 digests of the tenant's API keys; never the keys.
    key_hashes: tuple[bytes, ...] = field(default=(), repr=False)
    # None: no limit.
    requests_per_second: float | None = None
    tokens_per_minute: int | None = None
    # Lower is served first; the tenant's requests may ask for this or any larger value. None (ANONYMOUS only):
    # requests keep the priority they ask for.
    priority: int | None = 0

    def __post_init__(self):
        if not self.name:
            raise ValueError("tenants: a tenant name must not be empty")
        for name in ("requests_per_second", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"tenants.{self.name}.{name}: must be a number > 0, got {value!r}")
        if self.priority is not None and (not isinstance(self.priority, int) or not -2**31 <= self.priority < 2**31):
            raise ValueError(f"tenants.{self.name}.priority: must be a 32-bit integer, got {self.priority!r}")

    def request_priority(self, requested: int | None) -> int:
        """The priority a request of this tenant runs with: its own when it sends one, else the tenant's (0 when
        the tenant has none). PERMISSION_DENIED when it asks to go before its tenant's priority."""
        if requested is None:
            return 0 if self.priority is None else self.priority
        if self.priority is not None and requested < self.priority:
            raise RouterError(grpc.StatusCode.PERMISSION_DENIED,
                              f"priority: tenant {self.name!r} may use priority >= {self.priority} "
                              f"(lower is served first), got {requested}")
        return requested


# Every request's tenant while auth is off: no limits, the client's own priority.
ANONYMOUS = Tenant(DEFAULT_TENANT, priority=None)


@dataclass(frozen=True)
class TenancyConfig:
    tenants: tuple[Tenant, ...] = ()
    # Serve without API keys on a host other than loopback (auth is off by default only on loopback).
    disable_auth: bool = False

    def __post_init__(self):
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenants: names must be unique, got {sorted(names)}")
        digests = [h for t in self.tenants for h in t.key_hashes]
        if len(set(digests)) != len(digests):
            raise ValueError("tenants: an API key is listed more than once")
        if self.disable_auth and self.tenants:
            raise ValueError("disable_auth: cannot be set together with API keys")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tenants)

    def check_host(self, host: str) -> None:
        """ValueError when a router on `host` would serve without authentication and nobody said so."""
        if not self.tenants and not self.disable_auth and not is_loopback(host):
            raise ValueError(
                f"host: {host} is not a loopback address and no API key is configured; give keys "
                f"(--api-key-file, {API_KEYS_ENV}, --api-key or {VLLM_API_KEY_ENV}) or serve without "
                "authentication explicitly with --disable-auth")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_tenants(text: str, source: str) -> tuple[Tenant, ...]:
    """Tenants from a YAML/JSON document (the module docstring's format); ValueError naming `source` and the field.
    Messages never quote a key."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # The parser's message may quote the document (keys): name only the position.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{source}: not valid YAML or JSON{where}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), dict) or set(doc) != {"tenants"}:
        raise ValueError(f"{source}: must be a mapping with one key, tenants: {{name: {{api_keys: [...], ...}}}}")
    tenants = []
    for name, spec in doc["tenants"].items():
        where = f"{source}: tenants.{name}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: must be a mapping with {', '.join(TENANT_FIELDS)}")
        unknown = sorted(set(spec) - set(TENANT_FIELDS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(TENANT_FIELDS)}")
        keys = spec.get("api_keys")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"{where}.api_keys: must be a non-empty list of non-empty strings")
        try:
            tenants.append(Tenant(str(name), tuple(hash_key(k) for k in keys),
                                  requests_per_second=spec.get("requests_per_second"),
                                  tokens_per_minute=spec.get("tokens_per_minute"),
                                  priority=spec.get("priority", 0)))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return tuple(tenants)


def tenancy_from_sources(api_key_file: str | None, api_key: str | None, environ: Mapping[str, str],
                         disable_auth: bool = False) -> TenancyConfig:
    """The tenants of `--api-key-file`, the TANDEM_API_KEYS document, and `--api-key` (else VLLM_API_KEY) as the
    tenant "default"; ValueError naming the source."""
    tenants: list[Tenant] = []
    if api_key_file:
        try:
            with open(api_key_file) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"api_key_file: cannot read {api_key_file}: {e.strerror}") from None
        tenants += parse_tenants(text, api_key_file)
    if environ.get(API_KEYS_ENV):
        tenants += parse_tenants(environ[API_KEYS_ENV], API_KEYS_ENV)
    single = api_key or environ.get(VLLM_API_KEY_ENV)
    if single:
        tenants.append(Tenant(DEFAULT_TENANT, (hash_key(single),)))
    return TenancyConfig(tuple(tenants), disable_auth=disable_auth)


class KeyStore:
    """Finds the tenant of an `authorization` value; the digests are compared in constant time, all of them."""

    def __init__(self, config: TenancyConfig):
        self.enabled = config.auth_enabled
        self._entries = [(digest, t) for t in config.tenants for digest in t.key_hashes]

    def tenant(self, authorization: str | None) -> Tenant:
        """The caller's tenant (ANONYMOUS when auth is off); UNAUTHENTICATED for a missing or unknown key."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise RouterError(grpc.StatusCode.UNAUTHENTICATED,
                              "authorization: missing; send 'Authorization: Bearer <API key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise RouterError(grpc.StatusCode.UNAUTHENTICATED,
                              "authorization: must be 'Bearer <API key>'")
        digest = hash_key(key.strip())
        found = None
        for candidate, tenant in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = tenant
        if found is None:
            raise RouterError(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown API key")
        return found


def add_auth_arguments(parser) -> None:
    """The API-key options of `python -m router` and `tandem up`."""
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help=f"YAML/JSON tenants with their API keys, limits and priorities (see router/tenants.py); "
                             f"the {API_KEYS_ENV} environment variable may hold the same document")
    parser.add_argument("--api-key", default=None,
                        help=f"one API key for the tenant {DEFAULT_TENANT!r} (default: ${VLLM_API_KEY_ENV})")
    parser.add_argument("--disable-auth", action="store_true",
                        help="serve without API keys on a non-loopback --host (auth is off on loopback by default)")


def tenancy_from_args(args, environ: Mapping[str, str]) -> TenancyConfig:
    return tenancy_from_sources(args.api_key_file, args.api_key, environ, disable_auth=args.disable_auth)
