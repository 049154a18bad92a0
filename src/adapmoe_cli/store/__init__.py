"""The expert store: a directory with `manifest.json`, dense weights as safetensors, and every expert
packed as one 4096-aligned byte range so it can be read with a single O_DIRECT read.

- `manifest`: the versioned file format and the `Store` object that reads it;
- `writer`: `shard()` turns a checkpoint into a store, streaming and atomically;
- `reader`: `ExpertReader` reads one expert into a caller's buffer, bypassing the page cache;
- `verify`: checks every checksum."""

from adapmoe_cli.paths import is_store
from adapmoe_cli.store.manifest import FORMAT_VERSION, ExpertEntry, Store

__all__ = ["FORMAT_VERSION", "ExpertEntry", "Store", "is_store"]
