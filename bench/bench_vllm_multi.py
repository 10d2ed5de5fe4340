"""vLLM hit rate over time (issue 11): a stream of requests sharing a few long prefixes, served by a fleet
of instances that come and go, with and without ``KvfsConnector``.

``--requests`` requests (default 24) each pick one of ``--prefixes`` shared prefixes (default 4 of 1,024
tokens, a "system prompt" per application) at random and add their own ``--suffix``-token question (default
256). The stream is served in order by ``--instances`` fresh vLLM processes one after another (default 3:
a rolling restart, or a new replica joining), each taking the next equal slice of the stream. vLLM's own
prefix cache lives and dies with each process; kvfs keeps the blocks across them.

Per window of ``--window`` requests (default 4) the table gives where the prompt tokens came from:
vLLM's local prefix cache, kvfs, or computed; the hit rate (local + kvfs over prompt tokens); and the
mean time to first token. The same stream runs twice in one run: without a connector (baseline) and with
``KvfsConnector`` through the native client. The kvfs run's counts come from the connector's own events
file (per lookup: tokens vLLM already had, tokens found in kvfs). The baseline has no connector to count,
so its local hits are derived from the stream: the prefix's whole blocks when the same process served
that prefix before.

    python bench/bench_vllm_multi.py
    python bench/bench_vllm_multi.py --record docs/benchmarks.md

Benchmarks are not tests: nothing here asserts on time. It checks that both runs produce the same first
token for every request.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from bench_vllm import BLOCK, instance, model_and_cluster
from mdsection import command_line, run_facts, write_section

SECTION = "vLLM: hit rate over time, shared prefixes across instances (issue 11)"


def make_stream(args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(11)
    prefixes = [[rng.randrange(3, 4096) for _ in range(args.prefix_tokens)] for _ in range(args.prefixes)]
    picks = [rng.randrange(args.prefixes) for _ in range(args.requests)]
    prompts = [prefixes[p] + [rng.randrange(3, 4096) for _ in range(args.suffix)] for p in picks]
    return picks, prompts


def serve(work: str, label: str, model: str, spec: dict, prompts: list[list[int]], instances: int) -> list[dict]:
    """Serve the stream with ``instances`` fresh processes in turn; one row per request."""
    rows: list[dict] = []
    per = -(-len(prompts) // instances)
    warm = [[7] * 100]
    for i in range(instances):
        part = prompts[i * per:(i + 1) * per]
        if not part:
            break
        out = instance(work, f"{label}-{i}", {**spec, "model": model, "batches": [warm, *[[p] for p in part]],
                                              "max_model_len": 4096})
        lookups: dict[int, dict] = {}
        for event in out["events"]:
            if event["event"] == "lookup":
                # vLLM numbers requests in submission order ("<n>-<random>"); the last lookup counted.
                lookups[int(str(event["req"]).split("-")[0])] = event
        ordered = [lookups.get(n) for n in range(1, len(part) + 1)]  # request 0 is the warm-up
        for prompt, first, seconds, lookup in zip(part, out["outputs"][1:], out["seconds"][1:], ordered):
            rows.append({"instance": i, "tokens": len(prompt), "first": first[0], "seconds": seconds,
                         "local": lookup["local_tokens"] if lookup else None,
                         "kvfs": lookup["new_tokens"] if lookup else 0})
    return rows


def baseline_local(picks: list[int], prompts: list[list[int]], instances: int, prefix_tokens: int) -> list[int]:
    """Tokens vLLM's own prefix cache can serve without a connector: whole blocks of a prefix this process
    already served (its cache is large enough to keep every prefix of the stream)."""
    per = -(-len(prompts) // instances)
    local, seen = [], set()
    for n, pick in enumerate(picks):
        if n % per == 0:
            seen = set()
        local.append((prefix_tokens // BLOCK) * BLOCK if pick in seen else 0)
        seen.add(pick)
    return local


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prefixes", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--suffix", type=int, default=256)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--record", metavar="MD")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    picks, prompts = make_stream(args)
    with tempfile.TemporaryDirectory(prefix="bench-vllm-multi-") as tmp:
        work = args.workdir or tmp
        model, cluster = model_and_cluster(work, args.layers, args.hidden)
        try:
            base = serve(work, "none", model, {}, prompts, args.instances)
            kvfs = serve(work, "kvfs", model, {"connector": "kvfs", "extra": {
                "meta": cluster.meta_address, "root": "/kv", "model_id": "multi"}}, prompts, args.instances)
        finally:
            cluster.stop()
    same = [a["first"] == b["first"] for a, b in zip(base, kvfs)]
    for row, local in zip(base, baseline_local(picks, prompts, args.instances, args.prefix_tokens)):
        row["local"] = local
    for row in kvfs:  # no lookup event: vLLM's local cache already covered every full block
        if row["local"] is None:
            row["local"] = ((row["tokens"] - 1) // BLOCK) * BLOCK
    lines = [("| requests | instance | prompt tokens | baseline: local cache hit | baseline TTFT (s) | kvfs run: local "
              "| from kvfs | kvfs run hit rate | kvfs run TTFT (s) |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in range(0, len(kvfs), args.window):
        b, k = base[w:w + args.window], kvfs[w:w + args.window]
        tokens = sum(r["tokens"] for r in k)
        lines.append(
            f"| {w + 1}-{w + len(k)} | {'/'.join(sorted({chr(65 + r['instance']) for r in k}))} | {tokens} | "
            f"{sum(r['local'] for r in b) / tokens:.0%} | {statistics.mean(r['seconds'] for r in b):.3f} | "
            f"{sum(r['local'] for r in k) / tokens:.0%} | {sum(r['kvfs'] for r in k) / tokens:.0%} | "
            f"{sum(r['local'] + r['kvfs'] for r in k) / tokens:.0%} | {statistics.mean(r['seconds'] for r in k):.3f} |")
    total = sum(r["tokens"] for r in kvfs)
    summary = (f"Whole stream: baseline hit rate {sum(r['local'] for r in base) / total:.0%}, mean TTFT "
               f"{statistics.mean(r['seconds'] for r in base):.3f} s; with kvfs {sum(r['local'] + r['kvfs'] for r in kvfs) / total:.0%} "
               f"({sum(r['kvfs'] for r in kvfs) / total:.0%} from kvfs), mean TTFT {statistics.mean(r['seconds'] for r in kvfs):.3f} s; "
               f"same first token for {sum(same)}/{len(same)} requests.")
    table = "\n".join(lines)
    print(table + "\n\n" + summary)
    if args.record:
        import torch
        import vllm

        cmd = command_line("bench_vllm_multi.py", argv)
        body = (f"## {SECTION}\n\nCommand: `{cmd.strip()}` ({run_facts()}, "
                f"vLLM {vllm.__version__}, torch {torch.__version__}). {args.requests} requests, "
                f"each one of {args.prefixes} shared {args.prefix_tokens}-token prefixes (random) plus its own "
                f"{args.suffix} tokens, served in order by {args.instances} fresh vLLM processes in turn (A, B, C...: a "
                f"rolling restart); model: random bf16 Llama, {args.layers} layers, hidden {args.hidden}; block size "
                f"{BLOCK}. Baseline: no connector (vLLM's own prefix cache only; its local hits derived from the "
                f"stream). kvfs: `KvfsConnector`, native client; counts from its events (local = tokens vLLM already "
                f"had, from kvfs = tokens loaded from kvfs).\n\n{table}\n\n{summary}\n")
        write_section(args.record, SECTION, body)
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
