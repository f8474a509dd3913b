"""Stage 5, evaluation: the loops behind the scripts, over the detector.

The benchmark (experiments/evaluate.py, evaluate_stc.py):
* config.py: EvalConfig (everything that determines the numbers) and the checks a
  category must pass before any work;
* loop.py: read a category, fit, score, compute the metrics, write heatmaps;
* results.py: results.json (a contract: layout, validation, merge-on-write);
* metrics.py: image AUROC, pixel AUROC and AU-PRO as MVTec AD defines them;
* heatmaps.py: the heatmap PNGs.

Your own images, no ground truth (experiments/fit.py, predict.py):
* folders.py: fit on a folder of normal images (optionally calibrating a threshold),
  score a folder of new ones (imported as `from spade_jax.evaluation import folders`);
* predictions.py: predict.py's files: scores.csv, heatmaps/, summary.png.
"""

from spade_jax.evaluation.config import EvalConfig, check_test_labels
from spade_jax.evaluation.loop import (
                                       evaluate,
                                       evaluate_category,
                                       evaluate_category_multiprocess,
                                       evaluate_loaded,
                                       jax_process_index,
)
from spade_jax.evaluation.results import (
                                       LOCK_FILE,
                                       METRIC_NAMES,
                                       RESULTS_FILE,
                                       STAGE_NAMES,
                                       check_output_dir,
                                       format_table,
                                       load_results,
                                       mean_metrics,
)

__all__ = ["EvalConfig", "LOCK_FILE", "METRIC_NAMES", "RESULTS_FILE", "STAGE_NAMES",
           "check_output_dir", "check_test_labels", "evaluate", "evaluate_category",
           "evaluate_category_multiprocess", "evaluate_loaded", "format_table",
           "jax_process_index", "load_results", "mean_metrics"]
