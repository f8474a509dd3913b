r"""Measures candidate ensemble members once, so that ensembles of them can be compared
without refitting (how the default ensemble of spade_jax.detector.ensemble was chosen).

For every data folder, category and member (METHOD:METRIC:BACKBONE[:LAYERS]) it stores
in <output_dir>/<dataset>/<category>/<member>.npz what Ensemble.fit / score compute for
that member: the held-out normal statistics (both kinds) and the test scores and maps
(float32), plus the category's test labels and masks. ensemble_table.py then combines
them exactly as Ensemble.score does (combine_outputs) and prints the metrics.

  python experiments/ensemble_members.py --data_dirs=hard_s0=/tmp/b/hard_s0 \
      --members=patchcore:l2:efficientnet_lite0,padim::efficientnet_lite1 \
      --output_dir=/tmp/ensemble_members
"""

from collections.abc import Sequence
import pathlib
import time

from absl import app, flags
import numpy as np

from spade_jax.data import mvtec
from spade_jax.detector import ensemble as ensemble_lib
from spade_jax.features.preprocessing import preprocess_masks

_DATA_DIRS = flags.DEFINE_list("data_dirs", None, "NAME=FOLDER of MVTec-layout folders.")
_MEMBERS = flags.DEFINE_list("members", None, "Members (ensemble syntax).")
_OUTPUT = flags.DEFINE_string("output_dir", "/tmp/ensemble_members", "Where npz files go.")
_FOLDS = flags.DEFINE_integer("folds", ensemble_lib.DEFAULT_FOLDS, "Held-out folds.")


def main(argv: Sequence[str]) -> None:
  del argv
  specs = ensemble_lib.parse_members(_MEMBERS.value)
  from spade_jax.features.backbones import load_backbone  # pylint: disable=import-outside-toplevel
  backbones = {}

  def cached(name, weights):
    if name not in backbones:
      backbones[name] = load_backbone(name, weights=weights)
    return backbones[name]

  for item in _DATA_DIRS.value:
    dataset, folder = item.split("=", 1)
    for category in mvtec.list_categories(folder):
      out = pathlib.Path(_OUTPUT.value) / dataset / category
      out.mkdir(parents=True, exist_ok=True)
      data = mvtec.load_category(folder, category)
      if not (out / "truth.npz").exists():
        masks = preprocess_masks(data.test_masks, resize=256, crop=224)
        np.savez(out / "truth.npz", labels=np.asarray(data.test_labels), masks=masks)
      for spec in specs:
        path = out / (spec.text().replace(":", "_").replace("+", "-") + ".npz")
        if path.exists():
          continue
        start = time.perf_counter()
        ens = ensemble_lib.Ensemble.from_specs([spec], ensemble_lib.EnsembleConfig(
            folds=_FOLDS.value), load_backbone=cached)
        detector = ens.members[0]
        features = detector.extract(data.train_images)
        ho_scores, ho_maps = ensemble_lib.held_out_outputs(detector, features, _FOLDS.value)
        index = detector.fit_features(*ensemble_lib._args(features))  # pylint: disable=protected-access
        scores, maps = detector.score(index, data.test_images)
        stats = {}
        for kind in ensemble_lib.STATISTICS:
          stats[f"image_{kind}"] = ensemble_lib.statistics(ho_scores, kind)
          stats[f"pixel_{kind}"] = ensemble_lib.statistics(ho_maps, kind)
        np.savez(path, held_out_scores=ho_scores, scores=np.asarray(scores),
                 maps=np.asarray(maps, np.float32), **{k: np.asarray(v) for k, v in stats.items()})
        print(f"{dataset} {category} {spec.text()}: {time.perf_counter() - start:.0f} s",
              flush=True)


if __name__ == "__main__":
  app.run(main)
