"""Stage 4, the detector: SpadeConfig, the fitted SpadeIndex (a pytree value), Spade's
fit / score over the stages below (spade.py), and index files (index_file.py)."""

from spade_jax.detector.index_file import INDEX_FORMAT, INDEX_VERSION, load_index, save_index
from spade_jax.detector.spade import Spade, SpadeConfig, SpadeIndex, shard_index

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "Spade", "SpadeConfig", "SpadeIndex",
           "load_index", "save_index", "shard_index"]
