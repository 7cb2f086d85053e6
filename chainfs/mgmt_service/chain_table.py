"""Planning new chains from free targets: R targets on R distinct nodes, balanced.

Greedy, and optimal in the number of chains: each chain takes one target from
each of the R nodes with the most free targets left (the classic argument: a
set of R distinct nodes per chain is possible k times iff no node holds more
than its share, and taking from the fullest nodes keeps that true). Within a
chain, positions go to the nodes that have held that position least, so heads
(position 0, where writes enter) and every other position spread evenly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from chainfs.common.errors import ChainfsError, Code


def max_chains(free_by_node: Mapping[int, Sequence[int]], replicas: int) -> int:
    """How many chains of ``replicas`` distinct-node targets the free targets allow."""
    counts = sorted((len(v) for v in free_by_node.values() if v), reverse=True)
    if replicas <= 0 or len(counts) < replicas:
        return 0
    # Largest k with sum(min(c, k)) >= k * replicas.
    lo, hi = 0, sum(counts) // replicas
    while lo < hi:
        k = (lo + hi + 1) // 2
        if sum(min(c, k) for c in counts) >= k * replicas:
            lo = k
        else:
            hi = k - 1
    return lo


def plan_chains(
    free_by_node: Mapping[int, Sequence[int]],
    replicas: int,
    num_chains: int = 0,
    position_counts: Mapping[int, Sequence[int]] | None = None,
) -> list[list[int]]:
    """Chains (lists of target ids, head first) built from ``free_by_node``.

    ``free_by_node``: node id -> its free target ids (used in the given order).
    ``num_chains``: 0 = as many as possible. ``position_counts``: node id ->
    how often it already holds each position in existing chains (for balance).
    Raises NOT_ENOUGH_NODES (nothing planned) when the request cannot be met.
    """
    if replicas < 1:
        raise ChainfsError(Code.EINVAL, f"replicas must be >= 1, not {replicas}")
    if num_chains < 0:
        raise ChainfsError(Code.EINVAL, f"num_chains must be >= 0, not {num_chains}")
    nodes = sorted(n for n, ts in free_by_node.items() if ts)
    if len(nodes) < replicas:
        raise ChainfsError(
            Code.NOT_ENOUGH_NODES,
            f"{replicas} replicas need {replicas} storage nodes with free targets; "
            f"there are {len(nodes)}",
        )
    possible = max_chains(free_by_node, replicas)
    want = possible if num_chains == 0 else num_chains
    if want > possible:
        raise ChainfsError(
            Code.NOT_ENOUGH_NODES,
            f"{num_chains} chains of {replicas} replicas on distinct nodes need more free "
            f"targets; the free targets allow {possible}",
        )
    left = {n: list(free_by_node[n]) for n in nodes}
    pos: dict[int, list[int]] = {n: [0] * replicas for n in nodes}
    for n, counts in (position_counts or {}).items():
        if n in pos:
            for i, c in enumerate(counts[:replicas]):
                pos[n][i] = c
    chains: list[list[int]] = []
    for _ in range(want):
        # The R nodes with the most free targets left (ties: fewer heads, lower id).
        chosen = sorted(nodes, key=lambda n: (-len(left[n]), pos[n][0], n))[:replicas]
        assert len(chosen) == replicas and all(left[n] for n in chosen), "planning ran dry"
        order: list[int] = []
        rest = list(chosen)
        for p in range(replicas):
            n = min(rest, key=lambda n: (pos[n][p], sum(pos[n]), n))
            rest.remove(n)
            order.append(n)
            pos[n][p] += 1
        chains.append([left[n].pop(0) for n in order])
    return chains
