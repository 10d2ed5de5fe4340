"""Chunkserver: stores immutable, checksummed chunks on local disk and replicates them in a chain."""
