"""Target state machine of a chain, after 3FS (docs/design_notes.md, "Failure detection").

Every storage target has a *public* state (what clients and storage route by,
stored with the chain table) and a *local* state (reported by its storage node
in heartbeats; offline when the node misses heartbeats). mgmtd recomputes the
public states of a chain whenever a local state changes and on every periodic
scan, one step at a time, using :data:`TRANSITIONS` below.

The table is data. Each row is (current public state, local state, condition,
next public state). A condition looks at the *new* states already given to
targets of the same chain earlier in the same step; targets are visited group by
group in the order of :data:`VISIT_ORDER` (keeping chain order within a group),
which is what makes "the first serving target to fail becomes lastsrv" and "one
target syncs at a time" precise. The first matching row wins. After every
target is placed, :data:`FIXUPS` apply (a tentative lastsrv is demoted to
offline when the chain still has a serving target). The new chain order is the
targets grouped by new public state in :data:`CHAIN_ORDER`: serving targets
first, so a target that goes offline moves to the end of its chain.

Design-notes table (local, public, predecessor -> next), for reference; "has a
serving predecessor" is evaluated as "the chain has a serving target":

    up-to-date: serving->serving, syncing->serving, waiting->waiting,
                lastsrv->serving, offline->waiting
    online:     serving->serving, syncing->syncing|waiting(no serving),
                waiting->syncing|waiting(no serving), lastsrv->serving,
                offline->waiting
    offline:    serving->lastsrv(the last serving one)|offline, syncing->offline,
                waiting->offline, lastsrv->lastsrv, offline->offline
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chainfs.proto import mgmt_pb2 as mp


class PS(enum.IntEnum):
    """Public target state (values are the proto enum's)."""

    SERVING = mp.SERVING
    SYNCING = mp.SYNCING
    WAITING = mp.WAITING
    LASTSRV = mp.LASTSRV
    OFFLINE = mp.OFFLINE


class LS(enum.IntEnum):
    """Local target state (values are the proto enum's)."""

    UPTODATE = mp.UPTODATE
    ONLINE = mp.ONLINE
    OFFLINE = mp.LOCAL_OFFLINE


class Cond(enum.Enum):
    """Conditions over the new states already placed in this step."""

    ANY = "any"
    HAS_SERVING = "chain has a serving target"
    NO_SERVING = "chain has no serving target"
    HAS_SERVING_NO_SYNCING = "chain has a serving target and none syncing"
    NO_LASTSRV = "no target of the chain is lastsrv yet"


@dataclass(frozen=True)
class Rule:
    public: PS
    local: LS
    cond: Cond
    next: PS
    why: str = ""


_U, _N, _F = LS.UPTODATE, LS.ONLINE, LS.OFFLINE

TRANSITIONS: tuple[Rule, ...] = (
    # serving
    Rule(PS.SERVING, _U, Cond.ANY, PS.SERVING),
    Rule(PS.SERVING, _N, Cond.ANY, PS.SERVING),
    Rule(PS.SERVING, _F, Cond.NO_LASTSRV, PS.LASTSRV, "first serving target to fail"),
    Rule(PS.SERVING, _F, Cond.ANY, PS.OFFLINE, "another serving target failed first"),
    # lastsrv: holds the only complete copy; comes back as serving if nothing else serves
    Rule(PS.LASTSRV, _U, Cond.HAS_SERVING, PS.OFFLINE, "chain already has a serving target"),
    Rule(PS.LASTSRV, _U, Cond.ANY, PS.SERVING, "the last serving target returned"),
    Rule(PS.LASTSRV, _N, Cond.HAS_SERVING, PS.OFFLINE, "chain already has a serving target"),
    Rule(PS.LASTSRV, _N, Cond.ANY, PS.SERVING, "the last serving target returned"),
    Rule(PS.LASTSRV, _F, Cond.HAS_SERVING, PS.OFFLINE, "chain already has a serving target"),
    Rule(PS.LASTSRV, _F, Cond.ANY, PS.LASTSRV),
    # syncing
    Rule(PS.SYNCING, _U, Cond.ANY, PS.SERVING, "sync done"),
    Rule(PS.SYNCING, _N, Cond.HAS_SERVING, PS.SYNCING),
    Rule(PS.SYNCING, _N, Cond.ANY, PS.WAITING, "no serving target to sync from"),
    Rule(PS.SYNCING, _F, Cond.ANY, PS.OFFLINE),
    # waiting: one target syncs at a time, fed by the chain's serving targets
    Rule(PS.WAITING, _N, Cond.HAS_SERVING_NO_SYNCING, PS.SYNCING, "start sync"),
    Rule(PS.WAITING, _N, Cond.ANY, PS.WAITING),
    Rule(PS.WAITING, _U, Cond.ANY, PS.WAITING, "up-to-date only counts after a sync"),
    Rule(PS.WAITING, _F, Cond.ANY, PS.OFFLINE),
    # offline: a returning target waits first (one step), then syncs
    Rule(PS.OFFLINE, _N, Cond.ANY, PS.WAITING, "target returned"),
    Rule(PS.OFFLINE, _U, Cond.ANY, PS.WAITING, "target returned"),
    Rule(PS.OFFLINE, _F, Cond.ANY, PS.OFFLINE),
)

# Groups are visited in this order, so conditions see the serving targets first.
VISIT_ORDER: tuple[PS, ...] = (PS.SERVING, PS.LASTSRV, PS.SYNCING, PS.WAITING, PS.OFFLINE)

# Applied after every target is placed: (state, condition, replacement).
FIXUPS: tuple[tuple[PS, Cond, PS], ...] = (
    (PS.LASTSRV, Cond.HAS_SERVING, PS.OFFLINE),  # a complete copy survives: no lastsrv
)

# New chain order: head first.
CHAIN_ORDER: tuple[PS, ...] = (PS.SERVING, PS.LASTSRV, PS.SYNCING, PS.WAITING, PS.OFFLINE)

# Which public states serve what (design notes).
READABLE: frozenset[PS] = frozenset({PS.SERVING})
WRITABLE: frozenset[PS] = frozenset({PS.SERVING, PS.SYNCING})


def _holds(cond: Cond, placed: dict[PS, int]) -> bool:
    if cond is Cond.ANY:
        return True
    if cond is Cond.HAS_SERVING:
        return placed[PS.SERVING] > 0
    if cond is Cond.NO_SERVING:
        return placed[PS.SERVING] == 0
    if cond is Cond.HAS_SERVING_NO_SYNCING:
        return placed[PS.SERVING] > 0 and placed[PS.SYNCING] == 0
    if cond is Cond.NO_LASTSRV:
        return placed[PS.LASTSRV] == 0
    raise AssertionError(f"unknown condition {cond}")


def _index(rules: Iterable[Rule]) -> dict[tuple[PS, LS], tuple[Rule, ...]]:
    out: dict[tuple[PS, LS], list[Rule]] = {}
    for r in rules:
        out.setdefault((r.public, r.local), []).append(r)
    return {k: tuple(v) for k, v in out.items()}


_RULES = _index(TRANSITIONS)


def next_state(public: PS, local: LS, placed: dict[PS, int]) -> Rule:
    """The rule that applies to one target given the states already placed."""
    for rule in _RULES[(public, local)]:
        if _holds(rule.cond, placed):
            return rule
    raise AssertionError(f"no transition for public={public.name} local={local.name}")


@dataclass(frozen=True)
class Member:
    """One target of a chain: id and states."""

    target_id: int
    public: PS
    local: LS


def step_chain(members: Sequence[Member]) -> list[Member]:
    """One step of the state machine for a chain (head first) -> new chain.

    Pure: the same input always gives the same output. The output holds the
    same targets, reordered by :data:`CHAIN_ORDER`.
    """
    assert len({m.target_id for m in members}) == len(members), "duplicate target in chain"
    placed: dict[PS, int] = dict.fromkeys(PS, 0)
    decided: list[Member] = []
    for group in VISIT_ORDER:
        for m in members:
            if m.public != group:
                continue
            rule = next_state(m.public, m.local, placed)
            placed[rule.next] += 1
            decided.append(Member(m.target_id, rule.next, m.local))
    # Within a state group targets keep their visit order (old group, then old
    # position); a target changed by a fixup joins the end of its new group.
    visit = {m.target_id: i for i, m in enumerate(decided)}
    for state, cond, replacement in FIXUPS:
        if not _holds(cond, placed):
            continue
        for i, m in enumerate(decided):
            if m.public == state:
                decided[i] = Member(m.target_id, replacement, m.local)
                visit[m.target_id] += len(members)
                placed[state] -= 1
                placed[replacement] += 1
    rank = {s: i for i, s in enumerate(CHAIN_ORDER)}
    out = sorted(decided, key=lambda m: (rank[m.public], visit[m.target_id]))
    assert len(out) == len(members)
    return out


def writable(members: Sequence[Member]) -> bool:
    """A chain takes writes while it has a serving target (a lastsrv chain refuses)."""
    return any(m.public == PS.SERVING for m in members)
