"""What names a compiled module in the cache (engine.py), without loading
wasmtime: the web process checks whether the cache is warm before it spawns
its first worker, and never runs a guest itself (start-up)."""
from __future__ import annotations

# Engine settings are part of the cache key: a .cwasm only loads into an
# engine configured exactly like the one that wrote it.
ENGINE_TAG = "epoch1-fuel0"
# The pinned wasmtime (pyproject.toml). wasmtime-py has no __version__;
# engine.py prefers it should one appear, and a test keeps the two equal.
WASMTIME_VERSION = "49.0.0"
