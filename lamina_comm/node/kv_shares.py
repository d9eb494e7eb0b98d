"""One attention worker's KV cache shared by several model nodes (replicas).

Every replica's requests live in the same ``PagedKVCache`` under the key
(replica id, request id), so two replicas' request ids never collide and a
replica that leaves takes exactly its own blocks with it.

Admission is a guaranteed share with borrowing: with R replicas each is
guaranteed ``blocks_total // R`` blocks. A replica may reserve past its share
as long as what stays free still covers what every other replica is
guaranteed but does not hold yet. So one replica filling the pool is refused
(with a reason that names it) before it can starve another, and nothing is
ever evicted: a replica that borrowed keeps its blocks until its requests end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from lamina_comm.model import KVCacheFull, PagedKVCache


@dataclass
class _Holder:
    name: str
    blocks: dict[Hashable, int] = field(default_factory=dict)  # request id -> blocks it holds

    @property
    def held(self) -> int:
        return sum(self.blocks.values())


class KVShares:
    """Who holds which blocks of a shared cache, and the admission rule between them."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self._holders: dict[int, _Holder] = {}

    # -- replicas -------------------------------------------------------------
    def add(self, replica: int, name: str) -> None:
        self._holders[replica] = _Holder(name)

    def remove(self, replica: int) -> int:
        """Forget a replica and free every block it held; the number freed."""
        holder = self._holders.pop(replica, None)
        if holder is None:
            return 0
        for request_id in list(holder.blocks):
            self.cache.free((replica, request_id))
        return holder.held

    @property
    def replicas(self) -> int:
        return len(self._holders)

    @property
    def share(self) -> int:
        """Blocks each replica is guaranteed."""
        return self.cache.blocks_total // max(1, len(self._holders))

    def held(self, replica: int) -> int:
        return self._holders[replica].held

    def requests(self, replica: int) -> int:
        return len(self._holders[replica].blocks)

    def key(self, replica: int, request_id: Hashable) -> tuple[int, Hashable]:
        """The cache key of one replica's request."""
        return replica, request_id

    # -- reservations -----------------------------------------------------------
    def has(self, replica: int, request_id: Hashable) -> bool:
        return request_id in self._holders[replica].blocks

    def reserve(self, replica: int, request_id: Hashable, max_tokens: int) -> None:
        """Reserve for one replica's request; KVCacheFull names the replica when the rule refuses it."""
        holder = self._holders[replica]
        needed = self.cache.blocks_needed(max_tokens) if max_tokens >= 1 else 0
        kept = self.kept_for_others(replica)
        if needed > self.cache.blocks_free - kept:
            raise KVCacheFull(
                f"KV cache full for replica {holder.name!r}: request {request_id!r} needs {needed} blocks; it holds "
                f"{holder.held} of {self.cache.blocks_total} (guaranteed share {self.share} with "
                f"{len(self._holders)} model nodes), {self.cache.blocks_free} are free and {kept} of them are "
                f"kept for the other replicas' shares")
        self.cache.reserve(self.key(replica, request_id), max_tokens)  # ValueError on a bad request
        holder.blocks[request_id] = needed

    def free(self, replica: int, request_id: Hashable) -> None:
        holder = self._holders[replica]
        if holder.blocks.pop(request_id, None) is not None:
            self.cache.free(self.key(replica, request_id))

    def kept_for_others(self, replica: int) -> int:
        """Free blocks that other replicas are guaranteed but do not hold yet."""
        share = self.share
        return sum(max(0, share - other.held) for key, other in self._holders.items() if key != replica)
