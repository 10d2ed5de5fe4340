"""``KVStore.get_many`` in a loop through the native client, for A/B runs and profiles (py-spy).

    cd /tmp && python $CHECKOUT/bench/kv_get_loop.py [--secs 8] [--device-io auto] [--layout NAME]

Starts meta + one chunkserver (tests/cluster.py: replication 1, 4 MiB chunks, ``--fsync never``) under
``--dir``, puts 64 blocks of ``--layout`` (default 2 MiB: 16 tokens of a Llama-3-8B-like bf16 layout),
reads them once (warm), prints ``ready``, then calls ``get_many`` of 8 blocks into preallocated CPU
tensors for ``--secs`` seconds and prints GB/s and milliseconds per call. To compare two checkouts, run
it with ``PYTHONPATH`` pointing at each in turn. Nothing is asserted: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch
from cluster import Cluster

from kvfs.kv import KVLayout, KVStore, block_hashes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--secs", type=float, default=8.0)
    p.add_argument("--device-io", default="auto", help="KVStore device_io: auto (CPU out: host route) or staged")
    p.add_argument("--layout", default="bf16-t16-l32-h8-d128-tp0of1")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    layout = KVLayout.from_name(args.layout)
    work = tempfile.mkdtemp(prefix="kvfs-kv-loop-", dir=args.dir)
    cluster = Cluster(os.path.join(work, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                      chunkserver_args=("--fsync", "never")).start()
    try:
        with cluster.client(timeout=60.0) as client:
            store = KVStore("/kv/loop", layout, client=client, device_io=args.device_io, concurrency=8)
            hashes = block_hashes(range(16 * 64), 16, salt="loop")
            src = (torch.randint(-1000, 1000, (64, layout.nbytes // 2), dtype=torch.int16)
                   .view(layout.torch_dtype()).reshape(64, *layout.block_shape))
            for i in range(0, 64, 8):
                store.put_many([(h, src[i + k]) for k, h in enumerate(hashes[i:i + 8])])
            outs = torch.empty_like(src)
            for i in range(0, 64, 8):
                store.get_many(hashes[i:i + 8], [outs[i + k] for k in range(8)])
            print("ready", flush=True)
            calls = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.secs:
                for i in range(0, 64, 8):
                    store.get_many(hashes[i:i + 8], [outs[i + k] for k in range(8)])
                    calls += 1
            wall = time.perf_counter() - t0
            ok = torch.equal(outs.view(torch.int16), src.view(torch.int16))
            print(f"{calls * 8 * layout.nbytes / wall / 1e9:.2f} GB/s, {wall / calls * 1e3:.3f} ms per get_many(8), "
                  f"bit-exact: {ok}")
            store.close()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
