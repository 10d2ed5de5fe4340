"""NIXL (UCX) as kvfs's network data plane? Host memory in one process read into GPU memory in another
(issue 10, item 2), on one GPU host, to compare with kvfs's own TCP path in the same run.

A ``target`` process (the chunkserver's role) fills ``--gib`` GiB of pinned host memory with a known
pattern, registers it with a NIXL agent (UCX backend) in ``--chunk-mib`` MiB descriptors, and publishes
its agent metadata and descriptors through a file. An ``initiator`` process (the GPU client's role)
registers a CUDA buffer of the same size, adds the target's metadata, and READs every descriptor in one
NIXL transfer, ``--reps`` times; each pass is timed and the result compared with the pattern on the GPU.
Each ``--ucx-tls`` value is one pair of processes with that ``UCX_TLS``: "default" leaves UCX to pick
(on one host it may use shared memory or CMA, which no second host could), ``tcp,cuda_copy`` forces
the TCP transport that two hosts without RDMA would use.

    cd /tmp && PYTHONPATH=/tmp/nixl python3 $CHECKOUT/bench/nixl_transfer.py --gib 4 --out $OUT

Needs the ``nixl-cu13`` wheel (``import nixl_cu13``) and CUDA. Benchmarks are not tests: nothing here
asserts on time; a pass whose bytes differ is reported as not bit-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


def _nixl():
    try:
        import nixl_cu13 as nixl
    except ImportError:
        import nixl  # type: ignore[no-redef]
    return nixl


def _pattern(n_words: int, device: str):
    import torch

    return torch.arange(n_words, dtype=torch.int64, device=device) * 2654435761 % (1 << 61)


def target(args: argparse.Namespace) -> int:
    import torch

    nixl = _nixl()
    size = int(args.gib * (1 << 30)) // (args.chunk_mib * MiB) * args.chunk_mib * MiB
    agent = nixl.nixl_agent("target", nixl.nixl_agent_config(backends=["UCX"]))
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    buf.view(torch.int64).copy_(_pattern(size // 8, "cpu"))
    reg = agent.register_memory(buf)
    chunk = args.chunk_mib * MiB
    descs = agent.get_xfer_descs([buf[i:i + chunk] for i in range(0, size, chunk)])
    exchange = Path(args.exchange)
    tmp = exchange.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps({"meta": agent.get_agent_metadata(), "descs": agent.get_serialized_descs(descs),
                                  "size": size}))
    tmp.rename(exchange)
    deadline = time.monotonic() + args.timeout
    while not exchange.with_suffix(".done").exists():  # the initiator reads our memory meanwhile
        if time.monotonic() > deadline:
            print("target: no initiator within the timeout", file=sys.stderr)
            return 1
        time.sleep(0.05)
    agent.deregister_memory(reg)
    return 0


def initiator(args: argparse.Namespace) -> int:
    import torch

    nixl = _nixl()
    exchange = Path(args.exchange)
    deadline = time.monotonic() + args.timeout
    while not exchange.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("initiator: the target never published its metadata")
        time.sleep(0.05)
    info = pickle.loads(exchange.read_bytes())
    size, chunk = info["size"], args.chunk_mib * MiB
    agent = nixl.nixl_agent("initiator", nixl.nixl_agent_config(backends=["UCX"]))
    dst = torch.zeros(size, dtype=torch.uint8, device="cuda:0")
    reg = agent.register_memory(dst)
    remote_name = agent.add_remote_agent(info["meta"])
    remote = agent.deserialize_descs(info["descs"])
    local = agent.get_xfer_descs([dst[i:i + chunk] for i in range(0, size, chunk)])
    want = _pattern(size // 8, "cuda:0")
    rows = []
    try:
        for rep in range(args.reps):
            dst.zero_()
            torch.cuda.synchronize()
            handle = agent.initialize_xfer("READ", local, remote, remote_name)
            t0 = time.perf_counter()
            state = agent.transfer(handle)
            while state not in ("DONE", "ERR"):
                state = agent.check_xfer_state(handle)
                if time.perf_counter() - t0 > args.timeout:
                    state = "TIMEOUT"
                    break
            secs = time.perf_counter() - t0
            agent.release_xfer_handle(handle)
            exact = state == "DONE" and bool(torch.equal(dst.view(torch.int64), want))
            rows.append({"ucx_tls": os.environ.get("UCX_TLS", "default"), "rep": rep, "state": state,
                         "GBps": round(size / secs / 1e9, 3), "bytes": size, "chunk_mib": args.chunk_mib,
                         "bit_exact": exact})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        exchange.with_suffix(".done").write_text("done")
        agent.deregister_memory(reg)
    return 0 if all(r["bit_exact"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["run", "target", "initiator"], default="run")
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--chunk-mib", type=int, default=4, help="bytes per NIXL descriptor (a kvfs chunk)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ucx-tls", default="default;tcp,cuda_copy", help="';'-separated UCX_TLS values")
    p.add_argument("--exchange", default="")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    if args.role == "target":
        return target(args)
    if args.role == "initiator":
        return initiator(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for tls in args.ucx_tls.split(";"):
        env = dict(os.environ)
        if tls != "default":
            env["UCX_TLS"] = tls
        exchange = out / f"nixl-{tls.replace(',', '_')}.pickle"
        for f in (exchange, exchange.with_suffix(".done")):
            f.unlink(missing_ok=True)
        common = [sys.executable, __file__, "--gib", str(args.gib), "--chunk-mib", str(args.chunk_mib),
                  "--reps", str(args.reps), "--exchange", str(exchange), "--timeout", str(args.timeout)]
        tgt = subprocess.Popen([*common, "--role", "target"], env=env)
        try:
            ini = subprocess.run([*common, "--role", "initiator"], env=env, capture_output=True, text=True,
                                 timeout=args.timeout * (args.reps + 2))
        finally:
            try:
                tgt.wait(timeout=30)
            except subprocess.TimeoutExpired:
                tgt.kill()
        rows = [json.loads(line) for line in ini.stdout.splitlines() if line.startswith("{")]
        if ini.returncode and not rows:
            rows = [{"ucx_tls": tls, "error": ini.stderr[-1500:]}]
        results += rows
        for r in rows:
            print(json.dumps(r), flush=True)
    (out / "nixl.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
