"""``kvfs models ...``: the model-loading subcommands. ``kvfs.cli`` calls ``add_parser`` and ``run``.

``kvfs models load PATH [--device cuda:0]`` loads a safetensors file, index or model directory (a local
or mounted path, or with ``--meta`` a kvfs namespace path read through the client library), shows a
progress bar per file and prints the achieved GB/s. ``kvfs models put SRC DEST`` copies a local model
into kvfs, weight files with 16 MiB chunks (kvfs/models/put.py).

Error handling: malformed files, I/O errors and a missing CUDA print one line and exit with status 1
(``SystemExit``); ``run`` returns 0 on success.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

from kvfs.models.loader import LoadOptions, Progress, load_safetensors

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


class TqdmProgress(Progress):
    """One tqdm bar per file (bytes), created when the load starts."""

    def __init__(self, disable: bool = False):
        self._disable = disable
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self, files: list[tuple[str, int]]) -> None:
        from tqdm import tqdm

        for i, (name, total) in enumerate(files):
            self._bars[name] = tqdm(total=total, desc=name.rsplit("/", 1)[-1], unit="B", unit_scale=True,
                                    unit_divisor=1024, position=i, leave=True, disable=self._disable,
                                    file=sys.stderr, dynamic_ncols=True)

    def advance(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._bars[name].update(nbytes)

    def finish(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``models`` (with ``load``) on the top-level parser's subparsers."""
    p = subparsers.add_parser("models", help="load safetensors models")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    load = sub.add_parser("load", help="load a safetensors file, index or model directory and report GB/s")
    load.add_argument("path", help="file, *.safetensors.index.json or model directory")
    load.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    load.add_argument("--dtype", choices=DTYPE_NAMES, help="cast floating-point tensors after loading")
    load.add_argument("--meta", help="read PATH from kvfs through the client library (meta address host:port)")
    load.add_argument("--threads", type=int, help="parallel span reads")
    load.add_argument("--span-mib", type=int, help="size of one read in MiB (default 64)")
    load.add_argument("--pinned-buffers", type=int, help="GPU: pinned staging buffers of span size (default 8)")
    load.add_argument("--kvikio", dest="kvikio", action="store_true", default=None,
                      help="GPU: read with kvikio CuFile (default when kvikio is importable)")
    load.add_argument("--no-kvikio", dest="kvikio", action="store_false", help="GPU: use the pinned pipeline")
    load.add_argument("--hugepages", action="store_true", help="CPU: back large tensors with huge pages")
    load.add_argument("--no-progress", action="store_true", help="no progress bars")
    put = sub.add_parser("put", help="copy a local model directory or weight file into kvfs (weights get "
                         "16 MiB chunks)")
    put.add_argument("source", help="a local model directory or weight file")
    put.add_argument("dest", help="a kvfs directory (a kvfs path, not a mount path), e.g. /models/llama")
    put.add_argument("--chunk-size", default="16M", help="chunk size of weight files (default 16M; a power of "
                     "two from 64K to 256M); other files take the directory's policy")
    put.add_argument("--meta", default=None, help="meta address host:port (default: KVFS_META or 127.0.0.1:7600)")
    put.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    load.set_defaults(func=run)
    put.set_defaults(func=run_put)
    return p


def run_put(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvfs import config
    from kvfs.client import SyncClient
    from kvfs.layout import parse_chunk_size
    from kvfs.models.put import model_copies, put_model

    try:
        chunk_size = parse_chunk_size(args.chunk_size)
        total = sum(os.path.getsize(s) for s, _ in model_copies(args.source, args.dest))
        with SyncClient(args.meta or config.default_meta_address()) as c, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="put", disable=args.no_progress) as bar:
            files = c.call(put_model, c.client, args.source, args.dest, chunk_size=chunk_size, progress=bar.update)
    except (ValueError, OSError) as exc:
        print(f"kvfs models put: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for path, size in files:
        print(f"{path}  chunk size {config.format_size(size)}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    opts = LoadOptions(use_kvikio=args.kvikio)
    if args.threads:
        opts.threads = args.threads
    if args.span_mib:
        opts.span_bytes = args.span_mib << 20
    if args.pinned_buffers:
        opts.pinned_buffers = args.pinned_buffers
    opts.hugepages = args.hugepages
    dtype = getattr(torch, args.dtype) if args.dtype else None
    client = None
    try:
        if args.meta:
            from kvfs.client import SyncClient

            client = SyncClient(args.meta)
        init = 0.0
        if args.device != "cpu":
            # CUDA context creation (often seconds) is not loading: time it apart.
            t0 = time.perf_counter()
            torch.empty(1, device=args.device)
            init = time.perf_counter() - t0
        t0 = time.perf_counter()
        tensors = load_safetensors(args.path, args.device, dtype, client, options=opts,
                                   progress=TqdmProgress(args.no_progress))
        if args.device != "cpu":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"kvfs models load: {exc}", file=sys.stderr)
        raise SystemExit(1) from None  # a failure exits 1 whether or not the caller looks at the return
    finally:
        if client is not None:
            client.close()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"loaded {len(tensors)} tensors, {nbytes / 1e9:.3f} GB to {args.device} in {secs:.3f} s: "
          f"{nbytes / 1e9 / max(secs, 1e-9):.2f} GB/s" + (f" (CUDA init {init:.2f} s before)" if init else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m kvfs.models.cli load PATH``) until ``kvfs.cli`` wires it in."""
    parser = argparse.ArgumentParser(prog="kvfs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = parser.parse_args(["models", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
