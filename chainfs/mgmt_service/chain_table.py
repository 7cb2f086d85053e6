"""Planning new chains from free targets: R targets on R distinct nodes, balanced.

1. Node sets: each chain takes one target from each of the R nodes with the
   most free targets left. This greedy choice makes as many chains as possible
   (k chains fit iff sum(min(free_n, k)) >= k * R, and taking from the fullest
   nodes keeps that true).
2. Heads (position 0, where writes enter): each chain's head is the member
   heading the fewest chains so far, then heads are moved along augmenting paths
   (chain headed by a -> member b -> chain headed by b -> ...) until no node
   heads two more chains than one it could hand a head to: the most even split
   the node sets allow, counting the heads of existing chains.
3. Other positions go to the members that have held that position least.
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
    # 1. Which nodes each chain uses: the R with the most free targets left.
    sets: list[list[int]] = []
    for _ in range(want):
        chosen = sorted(nodes, key=lambda n: (-len(left[n]), n))[:replicas]
        assert len(chosen) == replicas and all(left[n] for n in chosen), "planning ran dry"
        for n in chosen:
            left[n].pop(0)
        sets.append(chosen)
    # 2. Heads, balanced: greedy, then augmenting paths until no node heads two
    #    more chains than another node it can hand a head to.
    heads = {n: pos[n][0] for n in nodes}
    head_of: list[int] = []
    for members in sets:
        h = min(members, key=lambda n: (heads[n], n))
        head_of.append(h)
        heads[h] += 1
    while _shift_one_head(sets, head_of, heads):
        pass
    # 3. The other positions go to the members that held them least.
    left = {n: list(free_by_node[n]) for n in nodes}
    chains: list[list[int]] = []
    for members, head in zip(sets, head_of, strict=True):
        pos[head][0] += 1
        order = [head]
        rest = [n for n in members if n != head]
        for p in range(1, replicas):
            n = min(rest, key=lambda n: (pos[n][p], sum(pos[n]), n))
            rest.remove(n)
            order.append(n)
            pos[n][p] += 1
        chains.append([left[n].pop(0) for n in order])
    return chains


def _shift_one_head(sets: list[list[int]], head_of: list[int], heads: dict[int, int]) -> bool:
    """Move one head along a path of chains from a node with the most heads to one
    with at least two fewer; False if there is no such path (heads are balanced)."""
    for a in sorted(heads, key=lambda n: (-heads[n], n)):
        parent: dict[int, tuple[int, int]] = {}  # node -> (previous node, chain index)
        frontier = [a]
        seen = {a}
        while frontier:
            nxt: list[int] = []
            for x in frontier:
                for i, members in enumerate(sets):
                    if head_of[i] != x:
                        continue
                    for y in members:
                        if y in seen:
                            continue
                        seen.add(y)
                        parent[y] = (x, i)
                        if heads[y] <= heads[a] - 2:
                            node = y
                            while node != a:
                                prev, chain = parent[node]
                                head_of[chain] = node
                                node = prev
                            heads[a] -= 1
                            heads[y] += 1
                            return True
                        nxt.append(y)
            frontier = nxt
    return False
