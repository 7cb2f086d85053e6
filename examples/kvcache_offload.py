"""Offload an inference engine's KV blocks to chainfs through `fs.kvcache`.

Engines that keep attention KV outside the GPU (vLLM's KV connectors, LMCache's
storage backends, Mooncake Store) cut a prompt into fixed-size token blocks and
name each block by a *chained* hash: block i's hash covers its own tokens and
the hash of block i-1, so it identifies the whole prefix up to there. They then
ask their storage backend four things:

    lookup(tokens)          -> how many leading tokens are already stored
    retrieve(tokens, bufs)  -> load those blocks into (pinned) buffers
    store(tokens, blocks)   -> save newly computed blocks
    contains / put / get    -> per-block calls (LMCache's backend shape)

`ChainfsKVOffload` below answers them with one KV-cache round trip each:
`batch_exists(...).leading_hits` for the prefix lookup, `batch_get_into` for
loading straight into the engine's buffers, `batch_put` for saving (a block
that is already stored is not written again). It imports no engine; an
adapter for a real one forwards its hooks to these methods.

The `__main__` part runs a tiny fake engine against a running cluster:

    chainfs up --data /tmp/chainfs-demo       # prints the mgmtd address
    python examples/kvcache_offload.py --address 127.0.0.1:PORT

It serves prompts that share a system prompt, shows the prefix hits growing,
and checks every loaded block byte for byte against a recomputation.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import chainfs


class ChainfsKVOffload:
    """A KV offload backend: token blocks <-> entries of one chainfs KV cache."""

    def __init__(
        self,
        fs: Any,
        directory: str,
        *,
        block_tokens: int = 16,
        model_tag: str = "model",
        ttl: float | None = None,
        capacity_bytes: int | None = None,
    ) -> None:
        self.block_tokens = block_tokens
        # The model (and anything else that changes KV bytes: dtype, TP rank,
        # layer range) is part of every key, so caches never mix models.
        self._root = hashlib.blake2b(model_tag.encode(), digest_size=16).digest()
        self.cache = fs.kvcache(directory, ttl=ttl, capacity_bytes=capacity_bytes)

    # -- keys ------------------------------------------------------------------
    def block_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``token_ids`` (a partial last block is not kept)."""
        out: list[bytes] = []
        parent = self._root
        n_full = len(token_ids) // self.block_tokens
        for b in range(n_full):
            block = token_ids[b * self.block_tokens : (b + 1) * self.block_tokens]
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(struct.pack(f"<{len(block)}q", *block))
            parent = h.digest()
            out.append(parent)
        return out

    # -- engine hooks ------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int]) -> int:
        """Leading tokens whose KV is stored (a multiple of block_tokens)."""
        hashes = self.block_hashes(token_ids)
        if not hashes:
            return 0
        return self.cache.batch_exists(hashes).leading_hits * self.block_tokens

    def retrieve(self, token_ids: Sequence[int], out_blocks: Sequence[Any]) -> int:
        """Load the leading stored blocks into ``out_blocks`` (one writable buffer per
        block, e.g. pinned host memory); returns the tokens loaded.

        A block evicted between lookup() and retrieve() simply ends the run: the
        engine recomputes from there."""
        hashes = self.block_hashes(token_ids)[: len(out_blocks)]
        if not hashes:
            return 0
        got = self.cache.batch_get_into(hashes, list(out_blocks[: len(hashes)]))
        loaded = 0
        for n in got:
            if n < 0:
                break
            loaded += 1
        return loaded * self.block_tokens

    def store(self, token_ids: Sequence[int], blocks: Sequence[Any], first_block: int = 0) -> int:
        """Save ``blocks`` as blocks ``first_block..`` of ``token_ids``; returns how many were
        new (already stored blocks are left as they are)."""
        hashes = self.block_hashes(token_ids)[first_block : first_block + len(blocks)]
        if not hashes:
            return 0
        return sum(self.cache.batch_put(hashes, list(blocks[: len(hashes)])))

    # -- LMCache-style per-key calls ------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return self.cache.exists(key)

    def put(self, key: bytes, kv_bytes: Any) -> None:
        self.cache.put(key, kv_bytes)

    def get(self, key: bytes) -> bytes | None:
        return self.cache.get(key)

    def close(self) -> None:
        self.cache.close()


# -- a fake engine for the demo -----------------------------------------------------------


class FakeEngine:
    """Produces deterministic 'KV' bytes per block, as prefill would (no model needed)."""

    def __init__(self, offload: ChainfsKVOffload, block_bytes: int) -> None:
        self.offload = offload
        self.block_bytes = block_bytes
        self.computed_blocks = 0
        self.loaded_blocks = 0

    def _compute_block(self, block_hash: bytes) -> bytes:
        # Stands in for the attention layers: the block's KV depends on its whole prefix.
        self.computed_blocks += 1
        seed = hashlib.sha256(block_hash).digest()
        return (seed * (self.block_bytes // len(seed) + 1))[: self.block_bytes]

    def prefill(self, token_ids: Sequence[int]) -> tuple[int, int]:
        """(tokens loaded from the cache, tokens computed) for one prompt."""
        hashes = self.offload.block_hashes(token_ids)
        cached_tokens = self.offload.lookup(token_ids)
        n_cached = cached_tokens // self.offload.block_tokens
        bufs = [bytearray(self.block_bytes) for _ in range(n_cached)]
        loaded_tokens = self.offload.retrieve(token_ids, bufs)
        n_loaded = loaded_tokens // self.offload.block_tokens
        for i in range(n_loaded):  # the demo checks what it loaded
            if bytes(bufs[i]) != self._expected(hashes[i]):
                raise AssertionError(f"block {i} loaded from the cache differs")
        self.loaded_blocks += n_loaded
        new = [self._compute_block(h) for h in hashes[n_loaded:]]
        self.offload.store(token_ids, new, first_block=n_loaded)
        return loaded_tokens, len(token_ids) - loaded_tokens

    def _expected(self, block_hash: bytes) -> bytes:
        seed = hashlib.sha256(block_hash).digest()
        return (seed * (self.block_bytes // len(seed) + 1))[: self.block_bytes]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--address", required=True, help="mgmtd address printed by `chainfs up`")
    ap.add_argument("--dir", default="/kvcache/demo", help="cache directory in chainfs")
    ap.add_argument("--block-tokens", type=int, default=16)
    # 2 layers x (K, V) x 16 tokens x 8 heads x 128 dims x 2 bytes (fp16) = 128 KiB.
    ap.add_argument("--block-bytes", type=int, default=2 * 2 * 16 * 8 * 128 * 2)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args(argv)

    system_prompt = list(range(1000, 1000 + 8 * args.block_tokens))  # shared by every prompt
    with chainfs.connect(args.address) as fs:
        tag = f"demo-{time.time_ns()}"  # a fresh model tag: the first prompt starts cold
        offload = ChainfsKVOffload(fs, args.dir, block_tokens=args.block_tokens, model_tag=tag)
        engine = FakeEngine(offload, args.block_bytes)
        for p in range(args.prompts):
            user = [p * 7919 + t for t in range(3 * args.block_tokens + 5)]
            tokens = system_prompt + user
            t0 = time.perf_counter()
            loaded, computed = engine.prefill(tokens)
            dt_ms = (time.perf_counter() - t0) * 1000
            print(
                f"prompt {p}: {len(tokens)} tokens, {loaded} loaded from chainfs, "
                f"{computed} computed ({dt_ms:.1f} ms)"
            )
        # The same prompt again: every full block comes from the cache.
        loaded, computed = engine.prefill(tokens)
        print(f"repeat of prompt {args.prompts - 1}: {loaded} loaded, {computed} computed")
        s = offload.cache.stats()
        print(
            f"cache: {s.entries} entries, {s.bytes / 2**20:.1f} MiB; this run: "
            f"{engine.loaded_blocks} blocks loaded, {engine.computed_blocks} computed, "
            f"hits={s.hits} misses={s.misses}"
        )
        offload.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
