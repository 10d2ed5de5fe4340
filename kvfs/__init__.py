"""kvfs: a distributed cache filesystem for LLM inference.

Layout: ``kvfs.protocol`` (wire format), ``kvfs.rpc`` (framing over trio), ``kvfs.client`` (the one
client library), ``kvfs.cli`` (the ``kvfs`` command). The services install as ``kvfs.meta``,
``kvfs.chunkserver`` and ``kvfs.mount`` from the repo's top-level folders of the same names.
"""

from kvfs.client import Client as Client
from kvfs.client import ClientOptions as ClientOptions
from kvfs.client import SyncClient as SyncClient

__version__ = "0.1.0"
