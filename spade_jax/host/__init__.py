"""Host-side utilities every stage may use: atomic file writes (atomic.py), locks of
folders that runs share (locks.py), the cache folder (paths.py), JAX's persistent
compilation cache (compilation_cache.py), progress lines and stage timings of long
loops (progress.py), and joining a multi-process run (distributed.py). Nothing here
imports another part of spade_jax."""
