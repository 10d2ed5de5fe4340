"""Metadata service: namespace, chunk maps and the chunkserver registry, persisted in RocksDB."""
