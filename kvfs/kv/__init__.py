"""kvfs.kv: KV-cache blocks on kvfs, for inference engines (issue 5; docs/kv.md).

Layout: ``hashing`` (token ids -> chained prefix block hashes), ``layout`` (what makes blocks
compatible, and its directory name), ``block`` (the self-describing block file), ``run`` (several
consecutive blocks of one prefix in one file, and how runs are named), ``store`` (``KVStore``:
put/get/exists/longest_prefix, and put_runs/get_runs/runs_prefix) over a ``backend``: ``native`` (kvfs client library) or ``posix`` (any
directory, e.g. the FUSE mount), ``device`` (``get`` into GPU tensors: kvikio or staged through pinned
memory), and ``policy`` (per-directory cache policy, ``kvfs status`` rows). Importing this package does
not import torch or kvikio; tensors are only touched by ``block``, ``device`` and ``store``.
"""

from kvfs.kv.block import BlockError as BlockError
from kvfs.kv.hashing import block_hashes as block_hashes
from kvfs.kv.layout import KVLayout as KVLayout
from kvfs.kv.store import KVStore as KVStore
