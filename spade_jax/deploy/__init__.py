"""Deploying a fitted detector: a folder that runs with jax, numpy, pillow and safetensors.

  spade_jax.export_detector(detector, index, "part_export", platforms=("cpu",))
  python part_export/run.py --images=incoming --output_dir=out

export.py writes the folder, programs.py turns each detector into arrays + a pure
function (a later detector registers its own), artifact.py lays the folder out on disk,
and runner.py is the standalone run.py copied into it (it imports no spade_jax).
"""

from spade_jax.deploy.export import export_detector

__all__ = ["export_detector"]
