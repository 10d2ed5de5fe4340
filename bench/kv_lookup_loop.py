"""KV lookups in a loop (issue 11): ``KVStore.runs_prefix`` of a 4,096-token prompt (16 runs of 8 blocks)
through the native client against a real meta and chunkserver (tests/cluster.py), over 4 stored
prompts for ``--seconds``; prints the number of lookups and the median round trip. Meta's work is most
of a lookup (py-spy of meta under this loop: docs/benchmarks.md, session 11).

    python bench/kv_lookup_loop.py [--seconds 6]

A benchmark, not a test: nothing is asserted on time; every lookup must find the prompt's 127 blocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from kvfs.kv import KVLayout

LAYOUT = KVLayout("bf16", 32, 8, 4, 64)  # bench_vllm.py's model: 8 layers, 4 KV heads, head_dim 64


def prompt_hashes(count: int = 4) -> list[list[str]]:
    """The block hashes of ``count`` 4,096-token prompts (block size 32)."""
    from kvfs.kv import block_hashes

    return [block_hashes(list(range(k * 10000, k * 10000 + 4096)), 32) for k in range(count)]


def store_prompts(store, prompts: list[list[str]]) -> None:
    """Put every prompt as runs of 8 random blocks (``store``'s layout)."""
    import torch

    from kvfs.kv.run import run_spans

    lay, g = store.layout, torch.Generator().manual_seed(1)
    for hashes in prompts:
        store.put_runs([(hashes[s:s + n], torch.randn((n, *lay.block_shape), generator=g).to(lay.torch_dtype()))
                        for s, n in run_spans(len(hashes), 8)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args(argv)
    from cluster import Cluster

    from kvfs.kv import KVStore

    prompts = prompt_hashes()
    with tempfile.TemporaryDirectory(prefix="kv-lookup-") as tmp:
        cluster = Cluster(os.path.join(tmp, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                          chunkserver_args=("--fsync", "never")).start()
        try:
            with cluster.client() as client, KVStore("/kv/native", LAYOUT, client=client, touch_interval=-1) as store:
                store_prompts(store, prompts)
                times = []
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    for hashes in prompts:
                        t0 = time.perf_counter()
                        found = store.runs_prefix(hashes, 8, 127)
                        times.append(time.perf_counter() - t0)
                        assert found.blocks == 127, found.blocks
            print(f"lookups {len(times)}  median {statistics.median(times) * 1000:.3f} ms  "
                  f"p90 {sorted(times)[int(len(times) * 0.9)] * 1000:.3f} ms")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
