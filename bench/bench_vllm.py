"""vLLM time to first token with a long shared prefix (issue 11): recompute vs vLLM's ExampleConnector on a
local directory vs ``KvfsConnector`` through the kvfs mount vs through the native client, in one run.

A Llama-architecture model is made locally with transformers (random bf16 weights, no download; default
8 layers, hidden 512, 8 heads, 4 KV heads, vocab 4096: big enough that a 4k-token prefill takes seconds on
a 2-core VM). A real kvfs cluster from ``tests/cluster.py`` (one chunkserver, replication 1, 4 MiB chunks,
``--fsync never``: KV blocks are a recomputable cache) and its FUSE mount hold the blocks.

Per mode, two fresh vLLM processes (``tests/vllm_instance.py``, CPU, ``enforce_eager``, scheduler and
worker in one process): the first serves ``--prompts`` prompts of ``--prefix`` tokens (saving their KV),
the second (a new process, so vLLM's own prefix cache is empty) serves the same prompts again, one
``generate`` call per prompt with ``max_tokens=1``: that call's wall time is the time to first token.
Each process first serves a short unrelated warm-up prompt. ``--rounds N`` repeats the measuring
processes N times, every mode in turn each round (after all populating ones), so load from other work on
a shared machine falls on all modes alike; each cell then has N x ``--prompts`` samples. ``recompute`` runs only the second process,
with no connector. kvfs modes also run the prompts with a new 64-token tail after the shared prefix
in a third fresh process (``+tail``: ExampleConnector only matches whole prompts, so it has no such
row). The share of the prompt served from the cache is the connector's own count (its events file): hit
tokens / prompt tokens (vLLM always computes the last token, and a partial last block).

    python bench/bench_vllm.py                      # prints the table
    python bench/bench_vllm.py --record docs/benchmarks.md
    python bench/bench_vllm.py --loading            # engine start to first token: vLLM's loader vs kvfs's

``--loading``: a bigger random bf16 Llama (default 8 layers, hidden 2048, vocab 32000: ~1.1 GB) is copied
onto the kvfs mount; fresh vLLM processes then start from it with the default loader (safetensors
through the mount), ``--load-format kvfs`` from the mount path, and ``--load-format kvfs`` through the
native client, each ``--repeat`` times, alternating; reported: seconds from the instance's ``main`` to
the engine being ready, and to the first token of a 16-token prompt.

Benchmarks are not tests: nothing here asserts on time. It checks that every mode answers with the
same greedy token as recompute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from cluster import Cluster
from mdsection import command_line, run_facts, write_section

SECTION = "vLLM: time to first token with a shared prefix (issue 11)"
LOAD_SECTION = "vLLM: engine start with weights on kvfs (issue 11)"
BLOCK = 32

BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, layers, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, max_position_embeddings=16384,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
torch.manual_seed(1234)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
"""


def instance(work: str, name: str, spec: dict) -> dict:
    spec = {"out": os.path.join(work, f"{name}.out.json"), "block_size": BLOCK, "max_tokens": 1,
            "max_model_len": 8192, "kv_cache_bytes": 512 << 20, **spec}
    if spec.get("extra") is not None and spec.get("connector") == "kvfs":
        spec["extra"] = {"stats_path": os.path.join(work, f"{name}.events"), **spec["extra"]}
    path = os.path.join(work, f"{name}.spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    with open(os.path.join(work, f"{name}.log"), "wb") as log:
        rc = subprocess.call([sys.executable, os.path.join(REPO, "tests", "vllm_instance.py"), path], stdout=log,
                             stderr=log, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=1800)
    if rc != 0:
        with open(os.path.join(work, f"{name}.log"), errors="replace") as f:
            raise RuntimeError(f"instance {name} failed:\n{f.read()[-4000:]}")
    with open(spec["out"]) as f:
        out = json.load(f)
    events_path = os.path.join(work, f"{name}.events")
    out["events"] = []
    if os.path.exists(events_path):
        with open(events_path) as f:
            out["events"] = [json.loads(line) for line in f]
    return out


def model_and_cluster(work: str, layers: int, hidden: int) -> tuple[str, Cluster]:
    """A random Llama under ``work/model`` and a started one-chunkserver cluster (KV blocks are a cache:
    no fsync)."""
    os.makedirs(work, exist_ok=True)
    model = os.path.join(work, "model")
    subprocess.run([sys.executable, "-c", BUILD, model, str(layers), str(hidden)], check=True, capture_output=True)
    cluster = Cluster(os.path.join(work, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                      chunkserver_args=("--fsync", "never")).start()
    return model, cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prefix", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per mode, each timed once per round (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh measuring processes per mode, the modes taking turns (default 1)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--modes", default="recompute,example,kvfs-mount,kvfs-native")
    p.add_argument("--record", metavar="MD", help="write the results as a section of this markdown file")
    p.add_argument("--mount-args", default="", help="extra `kvfs mount` options, e.g. \"--kv-timeout 0\" (A/B runs)")
    p.add_argument("--workdir", help="keep the instances' specs, logs and event files here (default: a temp dir)")
    p.add_argument("--loading", action="store_true", help="measure engine start with weights on kvfs instead")
    p.add_argument("--load-layers", type=int, default=8)
    p.add_argument("--load-hidden", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    if args.loading:
        return loading(args, argv)
    modes = args.modes.split(",")
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 4096) for _ in range(args.prefix)] for _ in range(args.prompts)]
    tails = [pr + [rng.randrange(3, 4096) for _ in range(64)] for pr in prompts]
    warm = [[rng.randrange(3, 4096) for _ in range(100)]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        work = args.workdir or tmp
        model, cluster = model_and_cluster(work, args.layers, args.hidden)
        try:
            mnt = cluster.mount(os.path.join(work, "mnt"), *args.mount_args.split())
            os.makedirs(os.path.join(mnt, "kv"))
            specs = {}
            for mode in modes:
                spec: dict = {"model": model}
                if mode == "example":
                    spec.update(connector="example", extra={"shared_storage_path": os.path.join(work, "example")})
                elif mode == "kvfs-mount":
                    spec.update(connector="kvfs", extra={"root": os.path.join(mnt, "kv"), "model_id": "bench"})
                elif mode == "kvfs-native":
                    spec.update(connector="kvfs", extra={"meta": cluster.meta_address, "root": "/kv",
                                                         "model_id": "bench-native"})
                elif mode != "recompute":
                    raise SystemExit(f"unknown mode {mode}")
                specs[mode] = spec
                if mode != "recompute":
                    instance(work, f"{mode}-populate", {**spec, "batches": [warm, *[[pr] for pr in prompts]]})
            # Rounds of every mode in turn: load from other work on the machine hits all modes alike.
            reference = None
            results: dict[str, dict] = {}
            for rnd in range(args.rounds):
                for mode in modes:
                    runs = [(mode, prompts)]
                    if mode.startswith("kvfs"):  # another fresh process: the same prefixes, new tails
                        runs.append((mode + " +tail", tails))
                    for label, timed in runs:
                        out = instance(work, label.replace(" +", "-") + f"-measure{rnd or ''}",
                                       {**specs[mode], "batches": [warm, *[[pr] for pr in timed]]})
                        firsts = [o[0] for o in out["outputs"][1:]]
                        if label == "recompute" and reference is None:
                            reference = firsts
                        r = results.setdefault(label, {"seconds": [], "hits": [], "same": []})
                        r["seconds"] += out["seconds"][1:]
                        if reference is not None and not label.endswith("+tail"):
                            r["same"].append(firsts == reference)
                        lookups = [e for e in out["events"] if e["event"] == "lookup"][1:]  # not the warm-up's
                        r["hits"] += [e["hit_tokens"] / e["prompt_tokens"] for e in lookups]
                        print(label, rnd, out["seconds"][1:], flush=True)
            for label, r in results.items():
                rows.append((label, statistics.median(r["seconds"]), r["seconds"],
                             statistics.mean(r["hits"]) if r["hits"] else None, all(r["same"]) if r["same"] else None))
        finally:
            cluster.stop()
    base = next((r[1] for r in rows if r[0] == "recompute"), None)
    ex = next((r[1] for r in rows if r[0] == "example"), None)
    lines = [("| mode | TTFT median (s) | each (s) | vs recompute | vs ExampleConnector | prefix from cache | "
              "same first token |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, med, each, hit, same in rows:
        lines.append(f"| {mode} | {med:.3f} | {', '.join(f'{s:.3f}' for s in each)} | "
                     f"{f'{base / med:.1f}x faster' if base and mode != 'recompute' else '-'} | "
                     f"{f'{med / ex:.2f}x its time' if ex and mode.startswith('kvfs') else '-'} | "
                     f"{'-' if hit is None else f'{hit:.1%}'} | {'-' if same is None else 'yes' if same else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        cmd = command_line("bench_vllm.py", argv)
        import torch
        import vllm

        body = (f"## {SECTION}\n\nCommand: `{cmd.strip()}` ({run_facts()}, "
                f"vLLM {vllm.__version__}, torch {torch.__version__}). Model: random bf16 "
                f"Llama, {args.layers} layers, hidden {args.hidden}, 4 KV heads; prompts of {args.prefix} tokens, "
                f"block size {BLOCK}; TTFT = one `generate` call with `max_tokens=1` in a fresh vLLM process "
                f"after another process served the same prompts; {args.rounds} round(s) of fresh measuring "
                f"processes, the modes taking turns.\n\n{table}\n")
        write_section(args.record, SECTION, body)
    return 0


def loading(args: argparse.Namespace, argv: list[str] | None) -> int:
    build = BUILD.replace("vocab_size=4096", "vocab_size=32000")
    rows: dict[str, list[tuple[float, float]]] = {}
    prompt = [[5 + i for i in range(16)]]
    with tempfile.TemporaryDirectory(prefix="bench-vllm-load-") as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        local = os.path.join(work, "model")
        subprocess.run([sys.executable, "-c", build, local, str(args.load_layers), str(args.load_hidden)], check=True,
                       capture_output=True)
        size = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local))
        cluster = Cluster(os.path.join(work, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                          chunkserver_args=("--fsync", "never")).start()
        try:
            mnt = cluster.mount(os.path.join(work, "mnt"))
            on_mount = os.path.join(mnt, "models", "big")
            shutil.copytree(local, on_mount)
            modes = {"vLLM default loader, model dir on the mount": {"model": on_mount},
                     "--load-format kvfs, mount path": {"model": on_mount, "load_format": "kvfs"},
                     "--load-format kvfs, native client": {"model": local, "load_format": "kvfs",
                                                           "loader_extra": {"meta": cluster.meta_address,
                                                                            "path": "/models/big"}}}
            first = None
            for r in range(args.repeat):
                for i, (label, spec) in enumerate(modes.items()):
                    out = instance(work, f"load-{r}-{i}",
                                   {**spec, "batches": [prompt], "max_model_len": 512, "kv_cache_bytes": 64 << 20})
                    first = first or out["outputs"]
                    assert out["outputs"] == first, f"{label}: another first token"
                    rows.setdefault(label, []).append((out["engine_ready"], out["engine_ready"] + out["seconds"][0]))
                    print(label, rows[label][-1], flush=True)
        finally:
            cluster.stop()
    lines = ["| loader | engine ready (s), each run | to first token (s), each run | median to first token |",
             "| --- | --- | --- | --- |"]
    for label, runs in rows.items():
        lines.append(f"| {label} | {', '.join(f'{a:.1f}' for a, _ in runs)} | {', '.join(f'{b:.1f}' for _, b in runs)} "
                     f"| {statistics.median(b for _, b in runs):.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        import torch
        import vllm

        cmd = command_line("bench_vllm.py", argv)
        body = (f"## {LOAD_SECTION}\n\nCommand: `{cmd.strip()}` ({run_facts()}, "
                f"vLLM {vllm.__version__}, torch {torch.__version__}). Model: random bf16 "
                f"Llama, {args.load_layers} layers, hidden {args.load_hidden}, vocab 32000, {size / 1e9:.2f} GB; "
                f"runs alternate between loaders; every run answered the same first token.\n\n{table}\n")
        write_section(args.record, LOAD_SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
