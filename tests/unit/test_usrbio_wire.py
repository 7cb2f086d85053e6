"""The agent protocol's framing and batch encoding, and how a batch is spread over workers."""

from __future__ import annotations

import errno

import pytest

from chainfs.client.usrbio import wire
from chainfs.client.usrbio.user import _split


def test_batch_and_results_round_trip() -> None:
    entries = [wire.Entry(1, 0, 5, 10, 0, b"/a"), wire.Entry(2, 7, 0, 3, 42, b"")]
    assert wire.decode_batch(wire.encode_batch(entries), 10) == entries
    results = [wire.Completion(10), wire.Completion(0, errno.ENOENT, "no entry")]
    assert wire.decode_results(wire.encode_results(results)) == results
    assert isinstance(results[1].error("/a"), FileNotFoundError)


def test_batches_over_the_bound_or_cut_short_are_refused() -> None:
    payload = wire.encode_batch([wire.Entry(1, 0, 0, 1, 0, b"/a")] * 3)
    with pytest.raises(wire.FrameError) as e:
        wire.decode_batch(payload, 2)
    assert e.value.errno == errno.E2BIG
    with pytest.raises(wire.FrameError):
        wire.decode_batch(payload[:-1], 10)


def test_parser_cuts_frames_and_bounds_their_size() -> None:
    parser = wire.FrameParser(max_frame_bytes=100)
    stream = wire.frame(wire.STATS, 7, b"x" * 10) + wire.frame(wire.BATCH, 8, b"y")
    assert parser.feed(stream[:5], []) == []
    frames = parser.feed(stream[5:], [])
    assert [(f.type, f.tag, f.payload) for f in frames] == [
        (wire.STATS, 7, b"x" * 10),
        (wire.BATCH, 8, b"y"),
    ]
    with pytest.raises(wire.FrameError):
        parser.feed(wire.frame(wire.BATCH, 9, b"z" * 101), [])


def test_split_gives_each_worker_a_contiguous_run_of_about_equal_bytes() -> None:
    assert _split([1] * 8, 2) == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])]
    assert _split([10, 1, 1, 1], 2) == [(0, [0]), (1, [1, 2, 3])]
    assert _split([5], 3) == [(0, [0])]
    assert _split([], 2) == [(0, [])]
    parts = _split(list(range(1, 65)), 3)
    assert sorted(i for _, idx in parts for i in idx) == list(range(64))
