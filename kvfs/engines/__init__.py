"""kvfs.engines: inference engines on kvfs, one module per engine behind that engine's own interface.

Layout: ``vllm`` (vLLM v1: ``KvfsConnector``, a ``KVConnectorBase_V1`` selected with
``kv_connector_module_path="kvfs.engines.vllm"``, and the ``--load-format kvfs`` model loader registered
through vLLM's ``vllm.general_plugins`` entry point), ``sglang`` (SGLang's HiCache L3 storage:
``KvfsHiCacheStorage``, a ``HiCacheStorage`` loaded with ``--hicache-storage-backend dynamic``), ``guard`` (bounded storage calls and the outage
breaker every engine adapter shares), ``pages`` (an engine's paged KV layout <-> kvfs's canonical block
layout), ``naming`` (a model's path level). Each adapter is thin: keys, layouts and error mapping; the storage
logic is ``kvfs.kv`` and ``kvfs.models``. Importing this package imports no engine; import the engine's
module (which needs that engine installed). See docs/engines.md.
"""
