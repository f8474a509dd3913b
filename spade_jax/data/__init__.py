"""Datasets, read on the host as NumPy arrays.

  mvtec       reader for any folder in the MVTec AD layout -> CategoryData.
  folder      a plain folder of images (any tree, no labels), for fit.py / predict.py.
  tfds_mvtec  tensorflow-datasets builder `mvtec_ad` (array_record, no TensorFlow);
              import it to register the builder.
  stc         ShanghaiTech Campus reader (extracted frames + pixel masks).
  builtin     the built-in benchmark: a deterministic generator of small categories
              in MVTec layout from images shipped with scikit-image.
  synthetic   synthetic anomalies of normal images (cut-paste, noise / texture blends)
              for objectives that learn from normal images only.

Submodules are imported explicitly (`from spade_jax.data import mvtec`), so that
importing one does not pull in tensorflow-datasets or scipy.
"""
