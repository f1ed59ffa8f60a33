"""The semantic cache's in-memory index: per tenant, per parameters key, a matrix of normalized embeddings.

Pure data (no I/O): the cache (cache.py) fills it from requests, from Redis at start and from other routers'
writes. A lookup only ever reads entries of the asking tenant with the same parameters key (the same operation,
conversation context and sampling parameters: query.py), so tenants never see each other's answers.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from router.cache.semantic.guards import conflict, normalize

# Candidates above the threshold checked against the guards, best first: the best may mean something else while
# the next is a true paraphrase.
MAX_CANDIDATES = 4


@dataclass(frozen=True, slots=True, eq=False)
class CacheEntry:
    """One cached answer."""

    entry_id: str
    tenant: str
    params_key: str
    prompt_text: str  # the text that was embedded (the prompt, or the last chat message)
    embedding: np.ndarray = field(repr=False)  # float32 [384], L2-normalized
    token_ids: tuple[int, ...]  # the completion as generated (a stop token included)
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    created_at: float  # unix seconds
    expires_at: float


@dataclass(frozen=True, slots=True)
class Match:
    """A lookup's outcome: `entry` None is a miss; `similarity` the best candidate's (0 when none);
    `rejected_by` the guard that turned down the best candidate above the threshold, if one did."""

    entry: CacheEntry | None
    similarity: float = 0.0
    rejected_by: str | None = None


class _Group:
    """Entries of one (tenant, params_key): their embeddings as one matrix, rebuilt lazily after a change."""

    def __init__(self):
        self.entries: dict[str, CacheEntry] = {}
        self.exact: dict[str, CacheEntry] = {}  # normalized prompt text -> newest entry
        self._ids: list[str] = []
        self._matrix: np.ndarray | None = None  # [len(_ids), dim]

    def add(self, entry: CacheEntry) -> None:
        self.entries[entry.entry_id] = entry
        self.exact[normalize(entry.prompt_text)] = entry
        self._matrix = None

    def remove(self, entry_id: str) -> None:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return
        key = normalize(entry.prompt_text)
        if self.exact.get(key) is entry:
            del self.exact[key]
        self._matrix = None

    def similarities(self, embedding: np.ndarray) -> tuple[list[str], np.ndarray]:
        if self._matrix is None:
            self._ids = list(self.entries)
            self._matrix = np.stack([self.entries[i].embedding for i in self._ids])
        return self._ids, self._matrix @ embedding  # cosine: both sides are normalized


class SemanticIndex:
    """Entries by tenant and parameters key; at most `max_entries_per_tenant` per tenant and `max_entries` in all
    (with auth off, X-Tenant-Id can name any number of tenants); the oldest go first."""

    def __init__(self, max_entries_per_tenant: int, max_entries: int | None = None):
        self.max_entries_per_tenant = max_entries_per_tenant
        self.max_entries = max_entries or max_entries_per_tenant
        self._groups: dict[tuple[str, str], _Group] = {}
        self._by_tenant: dict[str, OrderedDict[str, CacheEntry]] = {}
        self._all: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()  # insertion order, every tenant

    def __contains__(self, key: tuple[str, str]) -> bool:
        """(tenant, entry_id) is indexed."""
        tenant, entry_id = key
        return entry_id in self._by_tenant.get(tenant, ())

    def num_entries(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return len(self._by_tenant.get(tenant, ()))
        return len(self._all)

    @property
    def tenants(self) -> list[str]:
        return list(self._by_tenant)

    def add(self, entry: CacheEntry) -> list[CacheEntry]:
        """Index `entry` (replacing one with its id); returns the entries evicted to keep the tenant's cap."""
        self.remove(entry.tenant, entry.entry_id)
        entries = self._by_tenant.setdefault(entry.tenant, OrderedDict())
        entries[entry.entry_id] = entry
        self._all[(entry.tenant, entry.entry_id)] = entry
        self._groups.setdefault((entry.tenant, entry.params_key), _Group()).add(entry)
        evicted = []
        # Insertion order is age order: callers add entries oldest first.
        while len(entries) > self.max_entries_per_tenant:
            evicted.append(next(iter(entries.values())))
            self.remove(entry.tenant, evicted[-1].entry_id)
        while len(self._all) > self.max_entries:
            evicted.append(next(iter(self._all.values())))
            self.remove(evicted[-1].tenant, evicted[-1].entry_id)
        return evicted

    def remove(self, tenant: str, entry_id: str) -> None:
        entries = self._by_tenant.get(tenant)
        entry = entries.pop(entry_id, None) if entries is not None else None
        if entry is None:
            return
        del self._all[(tenant, entry_id)]
        group = self._groups[(tenant, entry.params_key)]
        group.remove(entry_id)
        if not group.entries:
            del self._groups[(tenant, entry.params_key)]
        if not entries:
            del self._by_tenant[tenant]

    def remove_expired(self, now: float) -> int:
        expired = [e for e in self._all.values() if e.expires_at <= now]
        for e in expired:
            self.remove(e.tenant, e.entry_id)
        return len(expired)

    def lookup(self, tenant: str, params_key: str, text: str, embedding: np.ndarray | None, threshold: float,
               now: float) -> Match:
        """The best entry of `tenant` with `params_key` whose similarity to `embedding` is >= `threshold` and that
        every guard accepts for `text`; an entry with the same text (case and spaces folded) matches without an
        embedding. Expired entries are skipped."""
        group = self._groups.get((tenant, params_key))
        if group is None:
            return Match(None)
        same = group.exact.get(normalize(text))
        if same is not None and same.expires_at > now:
            return Match(same, 1.0)
        if embedding is None:
            return Match(None)
        ids, sims = group.similarities(embedding)
        best = float(sims.max())
        rejected_by = None
        for i in np.argsort(-sims)[:MAX_CANDIDATES]:
            if sims[i] < threshold:
                break
            entry = group.entries[ids[i]]
            if entry.expires_at <= now:
                continue
            reason = conflict(text, entry.prompt_text)
            if reason is None:
                return Match(entry, float(sims[i]))
            rejected_by = rejected_by or reason
        return Match(None, best, rejected_by)
