"""A prefix lookup through the kvfs mount (issue 11): ``KVStore.runs_prefix`` of a 4,096-token prompt (16 runs
of 8 blocks) on a directory of the FUSE mount, each time after the kernel's 1 s entries have expired (as
for a new request seconds after the last), over 4 stored prompts. Reported: the lookup's median and
quartiles, and the CPU milliseconds meta and the mount daemon spent per lookup (including their idle
housekeeping over the waits, the same for both sides).

``--baseline-python PY`` runs the same loop a second time with the services (meta, chunkserver, mount) of
another checkout (that checkout's interpreter; tests/cluster.py's ``KVFS_TEST_PYTHON``), the two sides
alternating ``--pairs`` times, so a change and its baseline are measured in the same run.

    python bench/mount_kv_lookup.py [--lookups 30] [--pairs 2] [--baseline-python /tmp/base/bin/python]

A benchmark, not a test: nothing is asserted on time; every lookup must find the prompt's 128 blocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_side(lookups: int, python: str | None) -> dict[str, float]:
    from cluster import Cluster
    from kv_lookup_loop import LAYOUT, prompt_hashes, store_prompts

    from kvfs.kv import KVStore

    if python:
        os.environ["KVFS_TEST_PYTHON"] = python
    else:
        os.environ.pop("KVFS_TEST_PYTHON", None)
    prompts = prompt_hashes()
    with tempfile.TemporaryDirectory(prefix="mount-kv-lookup-") as tmp:
        cluster = Cluster(os.path.join(tmp, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                          chunkserver_args=("--fsync", "never")).start()
        try:
            mnt = cluster.mount(os.path.join(tmp, "mnt"))
            with KVStore(os.path.join(mnt, "kv"), LAYOUT, touch_interval=-1) as store:
                store_prompts(store, prompts)
                pids = {"meta": cluster.meta.popen.pid, "mount": cluster.mounts[mnt].popen.pid}
                before = {k: _cpu_seconds(p) for k, p in pids.items()}
                times = []
                for k in range(lookups):
                    time.sleep(1.1)  # past the kernel's 1 s entry timeout of the runs (and of "kv")
                    t0 = time.perf_counter()
                    found = store.runs_prefix(prompts[k % len(prompts)], 8)
                    times.append(time.perf_counter() - t0)
                    assert found.blocks == 128, found.blocks
                cpu = {k: (_cpu_seconds(p) - before[k]) / lookups for k, p in pids.items()}
        finally:
            cluster.stop()
    q = statistics.quantiles(times, n=4)
    return {"median": statistics.median(times) * 1e3, "p25": q[0] * 1e3, "p75": q[2] * 1e3,
            "meta_cpu": cpu["meta"] * 1e3, "mount_cpu": cpu["mount"] * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lookups", type=int, default=30, help="timed lookups per side and pair")
    p.add_argument("--pairs", type=int, default=1, help="rounds of (baseline, this checkout)")
    p.add_argument("--baseline-python", metavar="PY", help="another checkout's interpreter for the baseline side")
    args = p.parse_args(argv)
    sides = ([("baseline", args.baseline_python)] if args.baseline_python else []) + [("this checkout", None)]
    for pair in range(args.pairs):
        for label, python in sides:
            r = one_side(args.lookups, python)
            print(f"{label} (pair {pair + 1}): lookup median {r['median']:.1f} ms (quartiles {r['p25']:.1f}-"
                  f"{r['p75']:.1f}); CPU per lookup: meta {r['meta_cpu']:.1f} ms, mount {r['mount_cpu']:.1f} ms",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
