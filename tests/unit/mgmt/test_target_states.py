"""The target state table: complete, matches 3FS's design notes, safe on every reachable chain."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from chainfs.mgmt_service.target_states import (
    CHAIN_ORDER,
    LS,
    PS,
    TRANSITIONS,
    WRITABLE,
    Cond,
    Member,
    next_state,
    step_chain,
    writable,
)

ALL_PLACED = [
    dict(zip(PS, counts, strict=True)) for counts in itertools.product(range(3), repeat=len(PS))
]


def test_every_state_pair_has_a_rule_for_every_context() -> None:
    for public, local in itertools.product(PS, LS):
        rows = [r for r in TRANSITIONS if (r.public, r.local) == (public, local)]
        assert rows, f"no rule for {public.name}/{local.name}"
        assert rows[-1].cond is Cond.ANY, f"{public.name}/{local.name} can fall through"
        for placed in ALL_PLACED:
            assert next_state(public, local, placed).next in PS


def test_no_rule_is_unreachable() -> None:
    # A rule after an ANY rule of the same pair could never apply.
    for public, local in itertools.product(PS, LS):
        rows = [r for r in TRANSITIONS if (r.public, r.local) == (public, local)]
        assert all(r.cond is not Cond.ANY for r in rows[:-1]), f"{public.name}/{local.name}"


# The design notes' table, one target judged with a serving neighbour (True) or
# none (False): (local, public, chain has another serving target) -> next.
DESIGN_NOTES = [
    (LS.UPTODATE, PS.SERVING, None, PS.SERVING),
    (LS.UPTODATE, PS.SYNCING, None, PS.SERVING),
    (LS.UPTODATE, PS.WAITING, None, PS.WAITING),
    (LS.UPTODATE, PS.LASTSRV, False, PS.SERVING),
    (LS.UPTODATE, PS.OFFLINE, None, PS.WAITING),
    (LS.ONLINE, PS.SERVING, None, PS.SERVING),
    (LS.ONLINE, PS.SYNCING, True, PS.SYNCING),
    (LS.ONLINE, PS.SYNCING, False, PS.WAITING),
    (LS.ONLINE, PS.WAITING, True, PS.SYNCING),
    (LS.ONLINE, PS.WAITING, False, PS.WAITING),
    (LS.ONLINE, PS.LASTSRV, False, PS.SERVING),
    (LS.ONLINE, PS.OFFLINE, None, PS.WAITING),
    (LS.OFFLINE, PS.SERVING, False, PS.LASTSRV),
    (LS.OFFLINE, PS.SERVING, True, PS.OFFLINE),
    (LS.OFFLINE, PS.SYNCING, None, PS.OFFLINE),
    (LS.OFFLINE, PS.WAITING, None, PS.OFFLINE),
    (LS.OFFLINE, PS.LASTSRV, False, PS.LASTSRV),
    (LS.OFFLINE, PS.OFFLINE, None, PS.OFFLINE),
]


@pytest.mark.parametrize(("local", "public", "neighbour_serving", "expected"), DESIGN_NOTES)
def test_design_notes_table(
    local: LS, public: PS, neighbour_serving: bool | None, expected: PS
) -> None:
    contexts = [True, False] if neighbour_serving is None else [neighbour_serving]
    for serving in contexts:
        chain = [Member(1, public, local)]
        if serving:
            chain.append(Member(2, PS.SERVING, LS.UPTODATE))
        new = {m.target_id: m.public for m in step_chain(chain)}
        assert new[1] == expected, f"{local.name}/{public.name} serving={serving}"


def test_offline_target_moves_to_the_end_and_returns_through_waiting_and_syncing() -> None:
    chain = [Member(t, PS.SERVING, LS.UPTODATE) for t in (1, 2, 3)]
    chain = step_chain([Member(1, PS.SERVING, LS.OFFLINE), *chain[1:]])
    assert [(m.target_id, m.public) for m in chain] == [
        (2, PS.SERVING),
        (3, PS.SERVING),
        (1, PS.OFFLINE),
    ]
    back = [*chain[:2], Member(1, PS.OFFLINE, LS.ONLINE)]
    assert [m.public for m in step_chain(back)] == [PS.SERVING, PS.SERVING, PS.WAITING]
    back = step_chain(back)
    assert step_chain(back)[-1].public == PS.SYNCING
    synced = [*back[:2], Member(1, PS.SYNCING, LS.UPTODATE)]
    assert [m.public for m in step_chain(synced)] == [PS.SERVING] * 3


def test_last_serving_target_becomes_lastsrv_and_chain_refuses_writes() -> None:
    chain = [Member(1, PS.SERVING, LS.UPTODATE), Member(2, PS.OFFLINE, LS.OFFLINE)]
    new = step_chain([Member(1, PS.SERVING, LS.OFFLINE), chain[1]])
    assert [(m.target_id, m.public) for m in new] == [(1, PS.LASTSRV), (2, PS.OFFLINE)]
    assert not writable(new)
    # Another target coming back cannot serve: it waits for the lastsrv.
    new = step_chain([new[0], Member(2, PS.OFFLINE, LS.ONLINE)])
    new = step_chain(new)
    assert [(m.target_id, m.public) for m in new] == [(1, PS.LASTSRV), (2, PS.WAITING)]
    # The lastsrv returns: it serves, and in the same step the other one syncs from it.
    new = step_chain([Member(1, PS.LASTSRV, LS.ONLINE), new[1]])
    assert [(m.target_id, m.public) for m in new] == [(1, PS.SERVING), (2, PS.SYNCING)]


def test_when_all_serving_fail_at_once_only_the_first_is_lastsrv() -> None:
    new = step_chain([Member(t, PS.SERVING, LS.OFFLINE) for t in (1, 2, 3)])
    assert [(m.target_id, m.public) for m in new] == [
        (1, PS.LASTSRV),
        (2, PS.OFFLINE),
        (3, PS.OFFLINE),
    ]


def test_one_target_syncs_at_a_time() -> None:
    chain = [
        Member(1, PS.SERVING, LS.UPTODATE),
        Member(2, PS.WAITING, LS.ONLINE),
        Member(3, PS.WAITING, LS.ONLINE),
    ]
    new = step_chain(chain)
    assert [m.public for m in new] == [PS.SERVING, PS.SYNCING, PS.WAITING]


ALL_MEMBER_STATES = list(itertools.product(PS, LS))


@pytest.mark.parametrize("length", [1, 2, 3])
def test_step_invariants_on_every_chain(length: int) -> None:
    rank = {s: i for i, s in enumerate(CHAIN_ORDER)}
    for states in itertools.product(ALL_MEMBER_STATES, repeat=length):
        chain = [Member(i + 1, p, s) for i, (p, s) in enumerate(states)]
        new = step_chain(chain)
        assert new == step_chain(chain), "deterministic"
        assert sorted(m.target_id for m in new) == [m.target_id for m in chain]
        assert [rank[m.public] for m in new] == sorted(rank[m.public] for m in new)
        old = {m.target_id: m for m in chain}
        for m in new:
            assert m.local == old[m.target_id].local
            if m.local == LS.OFFLINE:
                assert m.public in (PS.OFFLINE, PS.LASTSRV), "an offline target serves nothing"
            if m.public == PS.SERVING:
                # Only a target that was serving, finished its sync, or held the last copy.
                was = old[m.target_id]
                assert (
                    was.public == PS.SERVING
                    or (was.public == PS.SYNCING and was.local == LS.UPTODATE)
                    or was.public == PS.LASTSRV
                ), (chain, new)
        if any(m.public == PS.SERVING for m in new):
            assert not any(m.public == PS.LASTSRV for m in new)
        assert writable(new) == any(m.public == PS.SERVING for m in new)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_reachable_chains_never_lose_the_complete_copy(replicas: int) -> None:
    """Explore every reachable chain from R serving targets under any sequence of
    local-state reports, tracking which targets hold every acknowledged write.

    A target misses writes while the chain is writable and it is not (serving or
    syncing); it is complete again after a sync (syncing -> serving on up-to-date).
    Invariants: serving and lastsrv targets are complete; the chain has serving
    targets or exactly one lastsrv; at most one target syncs.
    """
    start = tuple((t, PS.SERVING, LS.UPTODATE, True) for t in range(1, replicas + 1))
    seen = {start}
    todo = deque([start])
    while todo:
        chain = todo.popleft()
        for locals_ in itertools.product(LS, repeat=replicas):
            by_id = {t: (p, c) for t, p, _, c in chain}
            reported = dict(zip((t for t, *_ in chain), locals_, strict=True))
            members = [Member(t, by_id[t][0], reported[t]) for t, *_ in chain]
            new = step_chain(members)
            takes_writes = writable(new)
            nxt = []
            for m in new:
                was_public, complete = by_id[m.target_id]
                if was_public == PS.SYNCING and m.public == PS.SERVING:
                    complete = True  # sync done
                if takes_writes and m.public not in WRITABLE:
                    complete = False
                nxt.append((m.target_id, m.public, m.local, complete))
            state = tuple(nxt)
            serving = [s for s in state if s[1] == PS.SERVING]
            lastsrv = [s for s in state if s[1] == PS.LASTSRV]
            assert all(s[3] for s in serving + lastsrv), (chain, locals_, state)
            assert serving or len(lastsrv) == 1, (chain, locals_, state)
            assert sum(1 for s in state if s[1] == PS.SYNCING) <= 1, state
            if state not in seen:
                seen.add(state)
                todo.append(state)
    assert len(seen) > replicas  # explored more than the start
