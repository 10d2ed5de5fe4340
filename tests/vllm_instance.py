"""One vLLM engine instance for tests/test_engines_vllm.py and bench/bench_vllm.py, run as its own process.

``python tests/vllm_instance.py SPEC.json``: SPEC names the model, the engine options, the KV connector
(``connector``: "kvfs" or "example" with its extra config, or null) and batches of prompt token ids. Each
batch is one ``LLM.generate`` call (greedy); between batches the instance can wait for the test
(``pause``: write ``ready``, wait for ``go``) so the test can break kvfs mid-run. Writes
``{"outputs": [[token ids] per prompt], "seconds": [wall seconds of each batch's generate]}`` to
``out`` (with one request and ``max_tokens`` 1, a batch's seconds are its time to first token), and
``engine_ready``: seconds from the start of ``main`` (vLLM imported, model loaded, engine built).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    started = time.perf_counter()
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kt = None
    connector = spec.get("connector")
    if connector == "kvfs":
        kt = KVTransferConfig(kv_connector="KvfsConnector", kv_connector_module_path="kvfs.engines.vllm",
                              kv_role="kv_both", kv_connector_extra_config=spec["extra"])
    elif connector == "example":  # vLLM's own reference connector (one safetensors file per layer and prompt)
        kt = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                              kv_connector_extra_config=spec["extra"])
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, kv_transfer_config=kt,
              max_model_len=spec.get("max_model_len", 2048), block_size=spec.get("block_size", 32),
              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 64 << 20), seed=0,
              load_format=spec.get("load_format", "auto"), dtype=spec.get("dtype", "auto"),
              model_loader_extra_config=spec.get("loader_extra") or {},
              enable_prefix_caching=spec.get("prefix_caching", True))
    engine_ready = time.perf_counter() - started
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8))
    outputs, seconds = [], []
    for i, batch in enumerate(spec["batches"]):
        pause = spec.get("pause")
        if pause and i == pause["before_batch"]:
            open(pause["ready"], "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(pause["go"]) and time.monotonic() < deadline:
                time.sleep(0.1)
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        outputs += [list(r.outputs[0].token_ids) for r in res]
    with open(spec["out"], "w") as f:
        json.dump({"outputs": outputs, "seconds": seconds, "engine_ready": engine_ready}, f)


if __name__ == "__main__":
    main()
