"""Planning new chains from free targets: R targets on R distinct nodes, balanced.

1. Node sets: each chain takes one target from each of R nodes with the most
   free targets left. This greedy choice makes as many chains as possible
   (k chains fit iff sum(min(free_n, k)) >= k * R, and taking from the fullest
   nodes keeps that true), so every target is used when the counts allow it,
   and each node is in as many chains as it gave targets. Among nodes with
   equally many left the pick is seeded-random, so a node's chains spread over
   many peers and a failed node's resync load does too (a fixed tie-break
   would pair the same R nodes again and again).
2. Heads (position 0, where writes enter): each chain's head is the member
   heading the fewest chains so far; then heads move along augmenting paths
   (chain headed by a -> member b -> chain headed by b -> ...) until no node
   heads two more chains than a node it could hand a head to: the most even
   split the node sets allow, counting the heads of existing chains. Head
   counts are whole numbers, so the spread is at most one chain per node
   (max/min within 5% needs 20+ heads per node, or chains divisible by nodes).
3. Other positions go to the members that have held that position least.
"""

from __future__ import annotations

import random
from collections import deque
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
    The same input always gives the same plan.
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
    pos: dict[int, list[int]] = {n: [0] * replicas for n in nodes}
    for n, counts in (position_counts or {}).items():
        if n in pos:
            for i, c in enumerate(counts[:replicas]):
                pos[n][i] = c
    sets = _node_sets({n: len(free_by_node[n]) for n in nodes}, replicas, want)
    head_of = _balanced_heads(sets, {n: pos[n][0] for n in nodes})
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


def _node_sets(free: dict[int, int], replicas: int, want: int) -> list[list[int]]:
    """``want`` sets of ``replicas`` distinct nodes, each from the nodes with the
    most free targets left (seeded-random among equals). Nodes sit in buckets
    by free count, so one pick costs O(replicas), not O(nodes)."""
    rng = random.Random(f"{replicas}:{want}:{sorted(free.items())}")
    buckets: dict[int, list[int]] = {}
    for n in sorted(free):
        buckets.setdefault(free[n], []).append(n)
    top = max(buckets, default=0)
    sets: list[list[int]] = []
    for _ in range(want):
        chosen: list[int] = []
        level = top
        while len(chosen) < replicas:
            assert level > 0, "planning ran dry"
            bucket = buckets.get(level, [])
            taken = 0
            while bucket and len(chosen) < replicas and taken < len(bucket):
                # Pick a random unchosen node of this bucket (swap it to the end).
                i = rng.randrange(len(bucket) - taken)
                bucket[i], bucket[-1 - taken] = bucket[-1 - taken], bucket[i]
                chosen.append(bucket[-1 - taken])
                taken += 1
            level -= 1
        for n in chosen:
            bucket = buckets[free[n]]
            bucket.remove(n)
            free[n] -= 1
            buckets.setdefault(free[n], []).append(n)
        while top > 0 and not buckets.get(top):
            top -= 1
        sets.append(sorted(chosen))
    return sets


def _balanced_heads(sets: list[list[int]], heads: dict[int, int]) -> list[int]:
    """Each set's head: greedy (the member heading fewest), then augmenting
    paths until no node heads two more chains than one it can hand a head to."""
    head_of: list[int] = []
    headed: dict[int, set[int]] = {n: set() for n in heads}  # node -> chains it heads
    for i, members in enumerate(sets):
        h = min(members, key=lambda n: (heads[n], n))
        head_of.append(h)
        headed[h].add(i)
        heads[h] += 1
    while _shift_one_head(sets, head_of, heads, headed):
        pass
    return head_of


def _shift_one_head(
    sets: list[list[int]], head_of: list[int], heads: dict[int, int], headed: dict[int, set[int]]
) -> bool:
    """Move one head along a path of chains from a node heading L chains to one
    heading at most L - 2, for the highest L that has such a path; False if
    there is none (heads are balanced). One breadth-first search per level,
    from every node at that level at once."""
    levels = sorted(set(heads.values()), reverse=True)
    lowest = levels[-1] if levels else 0
    for level in levels:
        if level - 2 < lowest:
            return False
        sources = sorted(n for n, h in heads.items() if h == level)
        parent: dict[int, tuple[int, int]] = {}  # node -> (previous node, chain index)
        seen = set(sources)
        queue = deque(sources)
        while queue:
            x = queue.popleft()
            for i in sorted(headed[x]):
                for y in sets[i]:
                    if y in seen:
                        continue
                    seen.add(y)
                    parent[y] = (x, i)
                    if heads[y] <= level - 2:
                        _hand_over(y, parent, head_of, heads, headed)
                        return True
                    queue.append(y)
    return False


def _hand_over(
    end: int,
    parent: dict[int, tuple[int, int]],
    head_of: list[int],
    heads: dict[int, int],
    headed: dict[int, set[int]],
) -> None:
    """Apply an augmenting path: each chain on it is headed by the next node."""
    node = end
    heads[end] += 1
    while node in parent:
        prev, chain = parent[node]
        headed[prev].discard(chain)
        headed[node].add(chain)
        head_of[chain] = node
        node = prev
    heads[node] -= 1
