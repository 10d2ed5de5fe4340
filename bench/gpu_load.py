"""GPU model-loading benchmark for the device machine (H100): kvfs.models vs the baselines.

One command does everything and writes to ``--out`` (the device machine's $OUT)::

    PYTHONPATH=. python3 bench/gpu_load.py all --dir /var/tmp/kvfs-gpu --gib 8 --out $OUT

Steps: record the machine; generate a sharded ~``--gib`` GiB bf16 model (llama-like layout) with an
index; check that the kvfs loader is bit-exact against ``safetensors.torch.load_file`` on cuda:0;
measure the ceilings (pinned host-to-device copy, page-cache read rate); then time every method warm
(page cache filled, best of 2) and cold (``echo 3 > /proc/sys/vm/drop_caches`` right before the load).
Each measurement runs in its own process, so peak RSS and CPU time belong to that method alone:
GB/s, CPU-seconds per GB (process CPU time, all threads), peak RSS growth, pinned host memory.

Methods: ``kvfs-pinned`` (pinned-buffer pipeline), ``kvfs-kvikio`` (kvikio CuFile into device memory,
when kvikio imports), ``st-cuda`` (``load_file(device="cuda:0")``), ``st-cpu-to`` (``load_file`` then
``.to("cuda:0")``), ``fastsafetensors`` (when it imports), and CPU targets ``kvfs-cpu`` / ``st-cpu``.
Results: ``results.jsonl`` (one JSON object per measurement) and a table in ``log.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------------------- model generation


def layout(gib: float) -> list[tuple[str, tuple[int, ...]]]:
    """A llama-like bf16 layout of about ``gib`` GiB: hidden 4096, MLP 11008, vocab 32000."""
    h, m, v = 4096, 11008, 32000
    per_layer = [("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
                 ("self_attn.k_proj.weight", (h // 4, h)), ("self_attn.v_proj.weight", (h // 4, h)),
                 ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
                 ("mlp.gate_proj.weight", (m, h)), ("mlp.up_proj.weight", (m, h)),
                 ("mlp.down_proj.weight", (h, m))]
    layer_bytes = sum(2 * _numel(s) for _, s in per_layer)
    fixed = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    fixed_bytes = sum(2 * _numel(s) for _, s in fixed)
    layers = max(1, round((gib * GiB - fixed_bytes) / layer_bytes))
    out = [fixed[0]]
    for i in range(layers):
        out += [(f"model.layers.{i}.{n}", s) for n, s in per_layer]
    return out + fixed[1:]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def generate(d: Path, gib: float, shard_gib: float = 2.0) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    index = d / "model.safetensors.index.json"
    if index.exists():
        return sorted(d.glob("model-*.safetensors"))
    d.mkdir(parents=True, exist_ok=True)
    tensors = layout(gib)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        b = 2 * _numel(shape)
        if size and size + b > shard_gib * GiB:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += b
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    wmap = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {n: torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16).cpu() for n, s in shard}
        save_file(data, d / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in data.values())
        wmap.update({n: fname for n, _ in shard})
        del data
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    os.sync()
    return sorted(d.glob("model-*.safetensors"))


# --------------------------------------------------------------------------- one measurement (child)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _load(method: str, d: Path, files: list[Path], cfg: dict[str, Any]) -> dict[str, Any]:
    from kvfs.models import LoadOptions, load_safetensors

    dev = "cuda:0"
    if method.startswith("kvfs"):
        opts = LoadOptions(use_kvikio=method == "kvfs-kvikio")
        for k, v in cfg.items():
            setattr(opts, k, v)
        return load_safetensors(d, device="cpu" if method == "kvfs-cpu" else dev, options=opts)
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    if method == "st-cuda":
        for f in files:
            out.update(load_file(f, device=dev))
    elif method == "st-cpu":
        # load_file on CPU maps the file lazily; clone so every byte is read into process memory,
        # which is what the other methods deliver.
        for f in files:
            out.update({k: v.clone() for k, v in load_file(f).items()})
    elif method == "st-cpu-lazy":
        for f in files:
            out.update(load_file(f))
    elif method == "st-cpu-to":
        for f in files:
            out.update({k: v.to(dev) for k, v in load_file(f).items()})
    elif method == "fastsafetensors-cached":
        # fastsafetensors' default (disable_cache=True) reads with O_DIRECT, past the page cache.
        from fastsafetensors import SafeTensorsFileLoader

        loader = SafeTensorsFileLoader(None, dev, nogds=True, disable_cache=False)
        loader.add_filenames({0: [str(f) for f in files]})
        fb = loader.copy_files_to_device()
        out = {k: fb.get_tensor(k) for k in list(fb.key_to_rank_lidx)}
        fb.close()
        loader.close()
    elif method.startswith("fastsafetensors"):
        from fastsafetensors import fastsafe_open

        with fastsafe_open([str(f) for f in files], device=dev, nogds=method != "fastsafetensors-gds") as fo:
            out = {k: fo.get_tensor(k) for k in list(fo.keys())}
    else:
        raise SystemExit(f"unknown method {method}")
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    d = Path(args.dir)
    files = sorted(d.glob("model-*.safetensors"))
    cfg = json.loads(args.cfg or "{}")
    cuda = args.method not in ("kvfs-cpu", "st-cpu", "st-cpu-lazy")
    if cuda:
        torch.empty(1, device="cuda:0")
    if args.method == "kvfs-kvikio":
        import kvikio  # noqa: F401  (import cost outside the timing)
    if args.method.startswith("fastsafetensors"):
        import fastsafetensors  # noqa: F401
    results = []
    for rep in range(args.reps):
        dropped = drop_caches() if args.cold else None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5\n")  # reset the peak-RSS counter (VmHWM)
        except OSError:
            pass
        rss0 = _status("VmRSS")
        if cuda and hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()
        c0, t0 = time.process_time(), time.perf_counter()
        out = _load(args.method, d, files, cfg)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        cpu = time.process_time() - c0
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
        pinned = None
        if cuda and hasattr(torch.cuda, "host_memory_stats"):
            st = torch.cuda.host_memory_stats()
            pinned = st.get("allocated_bytes.all.peak", st.get("reserved_bytes.all.peak"))
        on_gpu = all(t.is_cuda for t in out.values())
        results.append({"method": args.method, "cfg": cfg, "cache": "cold" if args.cold else "warm", "rep": rep,
                        "dropped": dropped, "secs": round(secs, 4), "bytes": nbytes, "tensors": len(out),
                        "GBps": round(nbytes / 1e9 / secs, 3), "cpu_s_per_GB": round(cpu / (nbytes / 1e9), 4),
                        "peak_rss_growth_MiB": round((_status("VmHWM") - rss0) / MiB, 1),
                        "torch_pinned_peak_MiB": None if pinned is None else round(pinned / MiB, 1),
                        "on_gpu": on_gpu if cuda else None})
        del out
        if cuda:
            torch.cuda.empty_cache()
    print("RESULT " + json.dumps(results), flush=True)


# --------------------------------------------------------------------------- checks and ceilings (child)


def verify(args: argparse.Namespace) -> None:
    """kvfs to cuda:0 (pinned pipeline, and kvikio when present) is bit-exact vs load_file."""
    import torch
    from safetensors.torch import load_file

    from kvfs.models import LoadOptions, load_safetensors
    from kvfs.models.loader import kvikio_available

    d = Path(args.dir)
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("model-*.safetensors")):
        ref.update(load_file(f))
    variants = {"pinned": LoadOptions(use_kvikio=False), "pinned-4MiB-spans": LoadOptions(
        use_kvikio=False, span_bytes=4 * MiB, pinned_buffers=4)}
    if kvikio_available():
        variants["kvikio"] = LoadOptions(use_kvikio=True)
        variants["kvikio-64MiB-spans"] = LoadOptions(use_kvikio=True, kvikio_span_bytes=64 * MiB)
    report: dict[str, Any] = {}
    for name, opts in variants.items():
        try:
            got = load_safetensors(d, device="cuda:0", options=opts)
        except Exception as exc:  # noqa: BLE001  (record it, check the other variants)
            report[name] = {"error": repr(exc)[:500]}
            continue
        bad = [k for k, v in ref.items()
               if k not in got or got[k].dtype != v.dtype or got[k].shape != v.shape
               or not torch.equal(got[k].cpu().reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))]
        report[name] = {"tensors": len(got), "mismatched": bad[:5], "n_mismatched": len(bad),
                        "extra": sorted(set(got) - set(ref))[:5]}
        del got
        torch.cuda.empty_cache()
    try:
        _verify_mixed(d, report)
    except Exception as exc:  # noqa: BLE001  (keep the bf16 results above)
        report["mixed"] = {"error": repr(exc)[:500]}
    print("RESULT " + json.dumps([{"verify": report}]), flush=True)


def _verify_mixed(d: Path, report: dict[str, Any]) -> None:
    """Every dtype and odd shape (zero-size, 0-d, fp8, bool) with tiny spans: the CUDA byte-copy paths."""
    import torch
    from safetensors.torch import load_file, save_file

    from kvfs.models import LoadOptions, load_safetensors
    from kvfs.models.loader import kvikio_available

    sys.path.insert(0, str(ROOT / "tests"))
    from test_models import mixed_model

    mixed = d.parent / "kvfs-gpu-mixed.safetensors"
    save_file(mixed_model(seed=1, big=9 * MiB + 4), mixed)
    mref = load_file(mixed)
    for name, opts in {"mixed-pinned-4KiB": LoadOptions(use_kvikio=False, span_bytes=4096, pinned_buffers=4),
                       "mixed-pinned": LoadOptions(use_kvikio=False),
                       **({"mixed-kvikio": LoadOptions(use_kvikio=True),
                           "mixed-kvikio-1MiB": LoadOptions(use_kvikio=True, kvikio_span_bytes=MiB)}
                          if kvikio_available() else {})}.items():
        try:
            got = load_safetensors(mixed, device="cuda:0", options=opts)
        except Exception as exc:  # noqa: BLE001
            report[name] = {"error": repr(exc)[:500]}
            continue
        bad = [k for k, v in mref.items() if k not in got or got[k].dtype != v.dtype or got[k].shape != v.shape
               or not torch.equal(got[k].cpu().reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))]
        report[name] = {"tensors": len(got), "n_mismatched": len(bad), "mismatched": bad[:5],
                        "dtypes": len({str(v.dtype) for v in got.values()}),
                        "on_gpu": all(v.is_cuda for v in got.values())}


def ceilings(args: argparse.Namespace) -> None:
    import threading

    import torch

    out: dict[str, Any] = {}
    torch.empty(1, device="cuda:0")
    # First-load costs in a fresh process: pinning host memory and cudaMalloc of the model's tensors.
    t0 = time.perf_counter()
    pinned = [torch.empty(32 * MiB, dtype=torch.uint8, pin_memory=True) for _ in range(16)]
    out["pin_512MiB_secs"] = round(time.perf_counter() - t0, 4)
    del pinned
    from kvfs.models import read_header
    from kvfs.models.reader import LocalFileReader

    t0 = time.perf_counter()
    tensors = []
    for f in sorted(Path(args.dir).glob("model-*.safetensors")):
        r = LocalFileReader(str(f))
        tensors += [torch.empty(t.shape, dtype=t.dtype, device="cuda:0") for t in read_header(r).tensors.values()]
        r.close()
    torch.cuda.synchronize()
    out["cuda_alloc_model_secs"] = round(time.perf_counter() - t0, 4)
    del tensors
    n = 1 * GiB
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 8
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    out["pinned_h2d_GBps"] = round(reps * n / 1e9 / (time.perf_counter() - t0), 2)
    pageable = torch.empty(n, dtype=torch.uint8)
    pageable.fill_(1)
    t0 = time.perf_counter()
    for _ in range(3):
        dev.copy_(pageable)
    torch.cuda.synchronize()
    out["pageable_h2d_GBps"] = round(3 * n / 1e9 / (time.perf_counter() - t0), 2)
    del host, dev, pageable

    files = sorted(Path(args.dir).glob("model-*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    span = 64 * MiB
    work = [(f, off) for f in files for off in range(0, f.stat().st_size, span)]

    bufs: dict[tuple[int, bool], memoryview] = {}

    def buffer(i: int, pinned: bool) -> memoryview:
        if (i, pinned) not in bufs:
            t = torch.empty(span, dtype=torch.uint8, pin_memory=pinned)
            t.fill_(0)  # fault the pages in before any timing
            bufs[(i, pinned)] = memoryview(t.numpy())
            keep.append(t)
        return bufs[(i, pinned)]

    keep: list[torch.Tensor] = []

    def read_all(threads: int, pinned: bool) -> float:
        """Page cache (or disk) -> reused, pre-faulted buffers of 64 MiB: the loader's read stage."""
        lock = threading.Lock()
        items = list(work)
        mvs = [buffer(i, pinned) for i in range(threads)]
        fds = {f: os.open(f, os.O_RDONLY) for f in files}

        def run(mv: memoryview) -> None:
            while True:
                with lock:
                    if not items:
                        break
                    f, off = items.pop()
                os.preadv(fds[f], [mv], off)

        ts = [threading.Thread(target=run, args=(mv,)) for mv in mvs]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        secs = time.perf_counter() - t0
        for fd in fds.values():
            os.close(fd)
        return round(total / 1e9 / secs, 2)

    read_all(16, False)  # fill the page cache
    for threads in (1, 4, 8, 16, 32):
        out[f"pagecache_read_{threads}t_GBps"] = read_all(threads, False)
    for threads in (8, 16):
        out[f"pagecache_read_{threads}t_pinned_GBps"] = read_all(threads, True)
    if drop_caches():
        out["disk_read_16t_cold_GBps"] = read_all(16, False)
        read_all(16, False)
    print("RESULT " + json.dumps([{"ceilings": out, "bytes": total}]), flush=True)


# --------------------------------------------------------------------------- orchestration


def run_child(argv: list[str], log: Any, timeout: float, extra_env: dict[str, str] | None = None,
              ) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, *argv]
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        log.write(f"TIMEOUT after {timeout}s: {' '.join(argv)}\n")
        return [{"argv": argv, "error": "timeout"}]
    wall = time.perf_counter() - t0
    res: list[dict[str, Any]] = []
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    if p.returncode != 0 or not res:
        tail = (p.stderr or p.stdout)[-1500:]
        log.write(f"FAILED rc={p.returncode} ({wall:.1f}s): {' '.join(argv)}\n{tail}\n")
        return [{"argv": argv, "error": tail[-400:]}]
    log.write(f"ok ({wall:.1f}s): {' '.join(argv)}\n")
    return res


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a", buffering=1) as log, open(out / "results.jsonl", "a", buffering=1) as results:
        _run_all(args, log, results)


def _run_all(args: argparse.Namespace, log: Any, results: Any) -> None:
    d = Path(args.dir)
    start = time.perf_counter()

    def emit(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            results.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)

    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()

    import torch

    from kvfs.models.loader import kvikio_available

    have_kvikio = kvikio_available()
    try:
        import fastsafetensors  # noqa: F401
        have_fst = True
    except Exception as exc:  # noqa: BLE001
        have_fst = False
        log.write(f"fastsafetensors unavailable: {exc}\n")
    gpu = torch.cuda.is_available()  # False only for a dry run of this script on a CPU machine
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if gpu else None,
            "cpus": os.cpu_count(), "kvikio": have_kvikio, "fastsafetensors": have_fst,
            "mem": sh("grep -E 'MemTotal|MemAvailable' /proc/meminfo"), "df": sh(f"df -h {d.parent}"),
            "kernel": sh("uname -r"), "model_dir": str(d)}
    if have_kvikio:
        import kvikio
        import kvikio.defaults
        info["kvikio_version"] = kvikio.__version__
        info["kvikio_compat_mode_preferred"] = kvikio.defaults.is_compat_mode_preferred()
    emit([{"info": info}])

    t0 = time.perf_counter()
    files = generate(d, args.gib)
    emit([{"generated": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
           "secs": round(time.perf_counter() - t0, 1)}])
    methods = ["kvfs-cpu", "st-cpu"]
    if gpu:
        if not args.no_verify:
            emit(run_child(["verify", "--dir", str(d)], log, 240))
        emit(run_child(["ceilings", "--dir", str(d)], log, 180))
        methods = ["kvfs-pinned"] + (["kvfs-kvikio"] if have_kvikio else []) + ["st-cuda", "st-cpu-to"]
        methods += (["fastsafetensors"] if have_fst else []) + ["kvfs-cpu", "st-cpu"]
    if args.methods is not None:
        methods = [m for m in args.methods.split(",") if m]
    cold_methods = [m for m in methods if m != "st-cpu"]
    if args.cold_methods is not None:
        cold_methods = [m for m in args.cold_methods.split(",") if m]
    sweeps = [json.loads(s) for s in args.sweep]
    rows: list[dict[str, Any]] = []
    reps = str(args.reps)
    for m in methods:
        rows += run_child(["child", "--dir", str(d), "--method", m, "--reps", reps], log, 150)
        emit(rows[-args.reps:] if "error" not in rows[-1] else rows[-1:])
    for cfg in sweeps:
        m = cfg.pop("method", "kvfs-pinned")
        env = cfg.pop("env", None)
        rows += run_child(["child", "--dir", str(d), "--method", m, "--reps", reps, "--cfg", json.dumps(cfg)],
                          log, 150, env)
        if env:
            for r in rows[-args.reps:]:
                r["env"] = env
        emit(rows[-args.reps:] if "error" not in rows[-1] else rows[-1:])
    for m in cold_methods:
        if time.perf_counter() - start > args.budget:
            log.write(f"budget of {args.budget}s spent: cold {m} and later skipped\n")
            break
        rows += run_child(["child", "--dir", str(d), "--method", m, "--reps", "1", "--cold"], log, 150)
        emit(rows[-1:])
    table(rows, log)
    log.write(f"total {time.perf_counter() - start:.0f}s\n")


def table(rows: list[dict[str, Any]], log: Any) -> None:
    """One line per (method, config, cache): rep 0 is a first load in a fresh process, later reps the
    steady state (allocator caches and pinned buffers warm)."""
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        if "GBps" in r:
            cfg = dict(r["cfg"], **({"env": r["env"]} if r.get("env") else {}))
            groups.setdefault((r["method"], json.dumps(cfg) if cfg else "", r["cache"]), {})[r["rep"]] = r
    lines = [("| method | cfg | cache | first load s | first GB/s | steady s | steady GB/s | CPU s/GB (first) "
              "| peak RSS +MiB (first) |"), "|---|---|---|---|---|---|---|---|---|"]
    for (m, cfg, cache), reps in sorted(groups.items(), key=lambda kv: (kv[0][2], -kv[1][0]["GBps"]
                                                                        if 0 in kv[1] else 0)):
        first = reps.get(0)
        later = [r for k, r in reps.items() if k > 0]
        steady = max(later, key=lambda r: r["GBps"]) if later else None
        f = (first["secs"], first["GBps"], first["cpu_s_per_GB"], first["peak_rss_growth_MiB"]) if first else ("",) * 4
        st = (steady["secs"], steady["GBps"]) if steady else ("", "")
        lines.append(f"| {m} | {cfg} | {cache} | {f[0]} | {f[1]} | {st[0]} | {st[1]} | {f[2]} | {f[3]} |")
    text = "\n".join(lines) + "\n"
    log.write(text)
    print(text, flush=True)


def _ensure_kvfs_models() -> None:
    """Import kvfs.models; if the kvfs package's own imports (client deps) are missing on this machine,
    load kvfs.models alone under a bare ``kvfs`` package (it needs none of them for local paths)."""
    sys.path.insert(0, str(ROOT))
    try:
        import kvfs.models
    except ImportError as exc:
        if (exc.name or "").startswith("kvfs.models"):
            raise
        import types

        for m in [m for m in sys.modules if m == "kvfs" or m.startswith("kvfs.")]:
            del sys.modules[m]
        pkg = types.ModuleType("kvfs")
        pkg.__path__ = [str(ROOT / "kvfs")]
        sys.modules["kvfs"] = pkg
        import kvfs.models  # noqa: F401


def main() -> None:
    _ensure_kvfs_models()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--dir", default="/var/tmp/kvfs-gpu-model")
    a.add_argument("--gib", type=float, default=8.0)
    a.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a.add_argument("--budget", type=float, default=420.0, help="seconds after which cold runs are skipped")
    a.add_argument("--sweep", action="append", default=[],
                   help='extra warm configs as JSON, e.g. \'{"span_bytes": 16777216}\' (keys "method", "env")')
    a.add_argument("--methods", help="comma-separated warm methods (default: all available)")
    a.add_argument("--cold-methods", help="comma-separated cold methods (default: the warm ones but st-cpu)")
    a.add_argument("--reps", type=int, default=2, help="warm repetitions per process (the first is a first load)")
    a.add_argument("--no-verify", action="store_true")
    c = sub.add_parser("child")
    c.add_argument("--dir", required=True)
    c.add_argument("--method", required=True)
    c.add_argument("--reps", type=int, default=1)
    c.add_argument("--cold", action="store_true")
    c.add_argument("--cfg")
    for name in ("verify", "ceilings"):
        s = sub.add_parser(name)
        s.add_argument("--dir", required=True)
    args = ap.parse_args()
    {"all": run_all, "child": child, "verify": verify, "ceilings": ceilings}[args.cmd](args)


if __name__ == "__main__":
    main()
