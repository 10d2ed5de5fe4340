"""kvfs.engines: inference engines on kvfs, one module per engine behind that engine's own interface.

Layout: ``vllm`` (vLLM v1: ``KvfsConnector``, a ``KVConnectorBase_V1`` selected with
``kv_connector_module_path="kvfs.engines.vllm"``, and the ``--load-format kvfs`` model loader registered
through vLLM's ``vllm.general_plugins`` entry point), ``guard`` (bounded storage calls and the outage
breaker every engine adapter shares), ``pages`` (an engine's paged KV layout <-> kvfs's canonical block
layout). Each adapter is thin: keys, layouts and error mapping; the storage
logic is ``kvfs.kv`` and ``kvfs.models``. Importing this package imports no engine; import the engine's
module (which needs that engine installed). See docs/engines.md.
"""
