"""Stage 2, search: exact, streamed nearest-neighbour search under a distance kernel.

* distances.py: the Metric interface (matmul form + exact form) and l2 / sqeuclidean /
  cosine; a new fixed distance is a new Metric;
* kernels/: distances with parameters (spade_jax.kernels): pytrees whose parameters
  are traced, differentiable jit arguments (Mahalanobis, low-rank linear, RBF,
  Laplacian, polynomial, random Fourier and Nystrom features), learned with optax;
* neighbors.py: the streamed exact kNN on one device (running top-k, exact recompute);
* blocking.py: its blocking per platform (BLOCKINGS) and the bf16 precision option;
* cpu_kernel.py, csrc/knn_cpu.cc: the same search as an XLA FFI custom call on CPU
  (BLAS sgemm + in-cache selection), chosen only in CPU lowerings;
* sharding.py: galleries sharded over a mesh axis (padding + validity mask);
* sharded_neighbors.py: the search of a sharded gallery (shard_map, merged top-k);
* api.py: the public `knn` (spade_jax.knn), which chooses between the last two and
  neighbors.py;
* rows.py: rows of a gallery by index, on one device or sharded (no gather of the whole);
* coreset.py: PatchCore's greedy k-center coreset (spade_jax.coreset), one device or
  sharded.

Nothing is imported here: the compiled extension `_knn_cpu` lives in this package, and
loading it must not pull in the search modules that load it.
"""
