r"""Exports an index written by fit.py as a folder that runs without spade_jax.

  python experiments/export.py --index=part.spade --output_dir=part_export
  python part_export/run.py --images=incoming --output_dir=out

An ensemble index folder (fit.py --method=ensemble) exports the same way
(--index=part.ensemble): one program runs every member on the same input, standardises
their outputs by the index's statistics and combines them as predict.py does
(spade_jax.Ensemble.score), with the threshold's decision when the index holds one.
Its settings come from the index as predict.py takes them
(detector_flags.ensemble_settings_from_index); tiles are refused.

The folder (spade_jax.export_detector) holds the jax.export program (normalisation,
backbone, the streamed search in XLA alone, scoring, maps, and the threshold's decision
when the index holds one), its arrays in one safetensors file, manifest.json (versions,
settings, input size, platforms, SHA-256 of every file) and run.py, whose dependencies
are jax (with flatbuffers, which jax.export's deserialisation needs), numpy, pillow and
safetensors. run.py writes scores.csv as predict.py does.

Settings come from the index exactly as predict.py takes them (the detector flags of
predict.py, e.g. --kappa, override the recorded ones where predict.py allows it), so
run.py gives predict.py's scores. --platforms=cpu,cuda,tpu exports one program for
several platforms (exported on any machine: no accelerator needed). --batch_size is the
number of images per program call (run.py pads the last batch). --fixed_image_size=H,W
makes run.py refuse images of another size (default: any size, brought to the index's
input size as predict.py does: resized whole with fit.py's default --crop=none, or resized
and centre-cropped with a --crop index).

An index fitted on tiles (fit.py --tile_size) exports a program of tiles: its
--tile_size is the index's (another is an error naming the flag, as is --tile_size on
an index fitted without tiles); --tile_overlap and --tile_merge are the index's unless
given, as predict.py takes them. run.py then cuts every image into tiles at its native
resolution as predict.py does, stitches the maps and takes the largest tile score;
--batch_size counts tiles.
"""

from collections.abc import Sequence
import sys
import time

from absl import app, flags
import detector_flags
import index_settings

_INDEX = flags.DEFINE_string("index", None, "Index file (or ensemble index folder) written "
                             "by fit.py.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "The folder to write (new or empty).",
                                  required=True)
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu"], "Where the program may run: cpu, "
                               "cuda, rocm, tpu (comma-separated; one program for all).")
_FIXED_IMAGE_SIZE = flags.DEFINE_list("fixed_image_size", None, "H,W (or one side): run.py "
                                      "refuses images of another size. Default: any size.")
_DETECTOR = detector_flags.define_detector_flags(crop_default="none")
flags.adopt_module_key_flags(detector_flags)


def _image_size(values: list[str] | None):
  if not values:
    return None
  try:
    sides = [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--fixed_image_size must be H,W or one side in pixels, got "
                     f"{values}") from e
  return sides[0] if len(sides) == 1 else tuple(sides)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import spade_jax  # pylint: disable=import-outside-toplevel
  from spade_jax.deploy import artifact, export  # pylint: disable=import-outside-toplevel
  from spade_jax.detector import tiling  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  try:  # Everything checkable before the backbone loads.
    platforms = export.check_platforms(_PLATFORMS.value)
    fixed_image_size = export.check_image_size(_image_size(_FIXED_IMAGE_SIZE.value),
                                               "--fixed_image_size")
    artifact.check_output_dir(_OUTPUT_DIR.value)
    contents, settings, tiles = index_settings.read_index(_DETECTOR, _INDEX.value)
    detector_flags.detector_config(settings["method"], settings, _DETECTOR.batch_size.value)
    detector = detector_flags.make_detector(settings["method"], settings,
                                            _DETECTOR.batch_size.value)
    if tiles is not None:
      detector = tiling.Tiled(detector, tiles)
    out = spade_jax.export_detector(detector, contents.index, _OUTPUT_DIR.value,
                                    platforms=platforms, fixed_image_size=fixed_image_size,
                                    threshold=contents.threshold)
  except (ValueError, OSError) as e:  # Bad input: a message, not a traceback.
    sys.exit(f"export.py: error: {e}")
  size = sum(p.stat().st_size for p in out.iterdir())
  tiled = "" if tiles is None else f" (tiles of {tiles.tile_size}, overlap " \
      f"{tiles.tile_overlap}, merge {tiles.merge})"
  if settings["method"] == "ensemble":
    tiled = f" of {len(settings['ensemble_members'])} members ({settings['ensemble_combine']})"
  print(f"exported {settings['method']}{tiled} for {','.join(platforms)} in "
        f"{time.perf_counter() - start:.1f} s: {out} ({size / 2**20:.1f} MiB)")
  print(f"run it with: python {out / 'run.py'} --images=FOLDER --output_dir=OUT")


if __name__ == "__main__":
  app.run(main)
