"""PatchCore end to end with a tiny fake backbone: fit, score, mesh, index files."""

import json

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from scipy import ndimage
from spade_fake_backbone import FakeBackbone
from test_anomaly_map import _bilinear_ref
from test_detector import _images
from test_memory_bank import reference_scores
from test_patches import reference_patch_features, reference_per_level

import spade_jax
from spade_jax.detector import calibration, index_file
from spade_jax.features.preprocessing import preprocess

CONFIG = spade_jax.PatchCoreConfig(layers=("layer1", "layer2"), resize=72, crop=64,
                                   batch_size=3, coreset_ratio=0.25, projection_dim=8,
                                   num_neighbors=3)
NUM_TRAIN = 7
PATCHES = NUM_TRAIN * 16 * 16  # layer1's 16 x 16 grid at crop 64.
BANK = PATCHES // 4


@pytest.fixture(scope="module")
def fitted():
  rng = np.random.default_rng(0)
  patchcore = spade_jax.PatchCore(FakeBackbone(), CONFIG)
  train = _images(rng, NUM_TRAIN)
  test = np.concatenate([_images(rng, 3), _images(rng, 2, defect=True)])
  return patchcore, patchcore.fit(train), train, test


def _reference_patches(patchcore, images):
  feats = patchcore.backbone(preprocess(images, resize=72, crop=64))
  feats = {k: np.asarray(v) for k, v in feats.items()}
  return reference_patch_features(feats, CONFIG.layers, CONFIG.patch_size)


def test_index_layout(fitted):
  patchcore, index, _, _ = fitted
  assert isinstance(index, spade_jax.PatchCoreIndex)
  assert index.bank.shape == (BANK, 14) and index.num_entries == BANK  # 6 + 8 channels.
  assert not index.is_sharded and index.backbone_name == "fake_pyramid"
  assert index.feature_config == CONFIG.feature_config("fake_pyramid")
  assert len(index.fingerprint) == 16
  assert len(jax.tree_util.tree_leaves(index)) == 1  # The bank; the rest is static.
  doubled = jax.tree_util.tree_map(lambda x: 2 * x, index)
  assert doubled.feature_config == index.feature_config


def test_extract_and_bank_match_references(fitted):
  patchcore, index, train, _ = fitted
  patches = patchcore.extract(train)
  assert patches.shape == (NUM_TRAIN, 16, 16, 14) and isinstance(patches, np.ndarray)
  np.testing.assert_allclose(patches, _reference_patches(patchcore, train), rtol=1e-5,
                             atol=1e-5)
  # The bank is the coreset of all training patches, in selection order.
  flat = patches.reshape(-1, 14)
  chosen = np.asarray(spade_jax.coreset(flat, BANK, projection_dim=8, key=0))
  np.testing.assert_array_equal(np.asarray(index.bank), flat[chosen])
  assert len(set(chosen.tolist())) == BANK


@pytest.mark.parametrize("reweight", [False, True])
def test_score_matches_numpy_reference(fitted, reweight):
  patchcore, index, _, test = fitted
  patchcore = spade_jax.PatchCore(patchcore.backbone,
                                  spade_jax.PatchCoreConfig(**{**CONFIG.__dict__,
                                                               "reweight": reweight}))
  scores, maps = patchcore.score(index, test)
  assert scores.shape == (5,) and maps.shape == (5, 64, 64)
  ref_scores, score_maps = reference_scores(_reference_patches(patchcore, test),
                                            np.asarray(index.bank, np.float64), 1, "l2",
                                            3 if reweight else None)
  ref_maps = np.stack([ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0)
                       for m in _bilinear_ref(score_maps, 64, 64)])
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)
  s2, m2 = patchcore.score_features(index, patchcore.extract(test))
  np.testing.assert_allclose(s2, scores, rtol=1e-6)
  np.testing.assert_allclose(m2, maps, rtol=1e-6, atol=1e-7)


def test_defects_score_higher(fitted):
  patchcore, index, _, test = fitted
  scores, maps = patchcore.score(index, test)
  assert scores[3:].min() > scores[:3].max()
  for img, m in zip(test[3:], maps[3:]):
    inside = (img[8:72, 8:72] == (255, 0, 255)).all(-1)
    assert m[inside].mean() > 2 * m[~inside].mean()


def test_sharded_fit_and_score_equal_single_device(fitted):
  patchcore, index, train, test = fitted
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharded = patchcore.fit(train, mesh=mesh)
  assert sharded.is_sharded and sharded.num_entries == BANK
  np.testing.assert_array_equal(sharded.bank.to_numpy(), np.asarray(index.bank))
  scores, maps = patchcore.score(sharded, test)
  ref_scores, ref_maps = patchcore.score(index, test)
  # (The kNN's float32 proxies may pick another of two near-equidistant entries.)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)
  # An unsharded index is sharded for scoring by `mesh`.
  np.testing.assert_allclose(patchcore.score(index, test[:2], mesh=mesh)[0], ref_scores[:2],
                             rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip(fitted, tmp_path):
  patchcore, index, train, test = fitted
  path = tmp_path / "idx.patchcore"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=patchcore)
  assert isinstance(loaded, spade_jax.PatchCoreIndex)
  assert loaded.feature_config == index.feature_config
  np.testing.assert_array_equal(np.asarray(loaded.bank), np.asarray(index.bank))
  np.testing.assert_array_equal(patchcore.score(loaded, test[:2])[1],
                                patchcore.score(index, test[:2])[1])
  # A sharded bank is saved without its padding.
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  spade_jax.save_index(tmp_path / "sharded.patchcore", patchcore.fit(train, mesh=mesh))
  again = spade_jax.load_index(tmp_path / "sharded.patchcore")
  np.testing.assert_array_equal(np.asarray(again.bank), np.asarray(index.bank))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.patchcore", "sharded.patchcore"]


def test_load_refuses_the_other_detector_and_other_features(fitted, tmp_path):
  patchcore, index, _, test = fitted
  path = tmp_path / "idx.patchcore"
  spade_jax.save_index(path, index)
  with pytest.raises(ValueError, match="holds a PatchCoreIndex but a SpadeIndex"):
    spade_jax.load_index(path, expect=spade_jax.Spade(FakeBackbone()))
  with pytest.raises(ValueError, match="holds a PatchCoreIndex but a SpadeIndex"):
    spade_jax.load_index(path, expect=("fake_pyramid", spade_jax.SpadeConfig()))
  other = spade_jax.PatchCoreConfig(**{**CONFIG.__dict__, "patch_size": 5})
  with pytest.raises(ValueError, match="refit"):
    spade_jax.load_index(path, expect=("fake_pyramid", other))
  with pytest.raises(ValueError, match="refit"):
    spade_jax.PatchCore(FakeBackbone(name="other"), CONFIG).score(index, test[:1])
  # Scoring and coreset knobs do not change the bank's features: accepted.
  knobs = spade_jax.PatchCoreConfig(**{**CONFIG.__dict__, "reweight": True, "k_nearest": 2,
                                       "sigma": 2.0, "coreset_ratio": 0.5})
  spade_jax.load_index(path, expect=("fake_pyramid", knobs))
  spade_path = tmp_path / "idx.spade"
  spade = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=2, k_image_score=2, resize=72, crop=64, layers=("layer1",)))
  spade_jax.save_index(spade_path, spade.fit(_images(np.random.default_rng(1), 3)))
  with pytest.raises(ValueError, match="holds a SpadeIndex but a PatchCoreIndex"):
    spade_jax.load_index(spade_path, expect=patchcore)


def _forge(path, tensors, feature_config=None, **metadata):
  """A PatchCore index file with a self-consistent header (correct checksums), so that
  only the structural checks of load_index can object."""
  config = json.loads(CONFIG.feature_config("fake_pyramid"))
  config.update(feature_config or {})
  meta = {"format": index_file.PATCHCORE_INDEX_FORMAT, "version": index_file.INDEX_VERSION,
          "backbone": "fake_pyramid", "feature_config": json.dumps(config, sort_keys=True),
          "levels": json.dumps(list(CONFIG.layers))}
  meta.update(metadata)
  checksums = index_file._checksums(tensors, meta)  # pylint: disable=protected-access
  # Entries for exactly the tensors the format names, to get past the metadata checks.
  meta["checksums"] = json.dumps({k: checksums.get(k, "sha256:" + "0" * 64)
                                  for k in ["__metadata__", "bank"]})
  safetensors_numpy.save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("case,message", [
    ("consistent", None),
    ("flipped", "'bank' does not match its checksum"),
    ("edited_metadata", "metadata does not match its checksum"),
    ("bank_3d", "'bank'.*2 dimensions"),
    ("bank_f64", "'bank'.*F64"),
    ("extra_tensor", "unexpected tensors.*'pool'"),
    ("no_bank", "no tensor 'bank'"),
    ("wide_bank", "'bank' has 20 channels.*embed_dim is 16"),
    ("patch_size", "patch_size=2.*odd"),
    ("reduction", "reduction='pca'"),
    ("seed_missing", "reduction_seed"),
    ("fields", r"feature_config.*fields.*PatchCoreConfig"),
    ("levels", "feature_config.*layers.*levels"),
])
def test_patchcore_index_file_integrity(fitted, tmp_path, case, message):
  _, index, _, _ = fitted
  bank = np.asarray(index.bank)
  path = tmp_path / "forged.patchcore"
  tensors, config, meta = {"bank": bank}, {}, {}
  if case == "bank_3d":
    tensors = {"bank": bank[:, :, None]}
  elif case == "bank_f64":
    tensors = {"bank": bank.astype(np.float64)}
  elif case == "extra_tensor":
    tensors = {"bank": bank, "pool": bank[:2]}
  elif case == "no_bank":
    tensors = {"pool": bank}
  elif case == "wide_bank":
    tensors, config = {"bank": np.zeros((3, 20), np.float32)}, {"embed_dim": 16}
  elif case == "patch_size":
    config = {"patch_size": 2}
  elif case == "reduction":
    config = {"reduction": "pca"}
  elif case == "seed_missing":
    config = {"reduction": "random_projection"}
  elif case == "fields":
    config = {"extra": 1}
  elif case == "levels":
    meta = {"levels": json.dumps(["layer1"])}
  _forge(path, tensors, config, **meta)
  if case == "flipped":
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
  elif case == "edited_metadata":
    spade_jax.save_index(path, index)
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + header_size])
    edited = json.loads(header["__metadata__"]["feature_config"])
    edited["embed_dim"] = 2048
    header["__metadata__"]["feature_config"] = json.dumps(edited, sort_keys=True)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + header_size:])
  if message is None:
    loaded = spade_jax.load_index(path)
    np.testing.assert_array_equal(np.asarray(loaded.bank), bank)
    return
  with pytest.raises(ValueError, match=message) as e:
    spade_jax.load_index(path)
  assert str(path) in str(e.value)


def test_bad_input(fitted):
  patchcore, index, train, test = fitted
  with pytest.raises(ValueError, match="train_images is empty"):
    patchcore.fit(train[:0])
  with pytest.raises(ValueError, match=r"k_nearest=500 is larger than the memory bank"):
    spade_jax.PatchCore(patchcore.backbone, spade_jax.PatchCoreConfig(
        **{**CONFIG.__dict__, "k_nearest": 500})).score(index, test[:1])
  with pytest.raises(ValueError, match="index must be a PatchCoreIndex"):
    patchcore.score({"bank": 1}, test[:1])
  with pytest.raises(ValueError, match="needs a mesh"):
    patchcore.fit_features(patchcore.extract(train[:1]), process_local=True)
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    patchcore.score(index, test[0])
  with pytest.raises(ValueError, match="no features"):
    spade_jax.PatchCore(patchcore.backbone, spade_jax.PatchCoreConfig(layers=("layer9",)))
  with pytest.raises(ValueError, match="SpadeIndex or a PatchCoreIndex"):
    spade_jax.save_index("/tmp/never.patchcore", {"bank": 1})


@pytest.mark.parametrize("field,value", [
    ("patch_size", 4), ("embed_dim", 0), ("reduction", "pca"), ("reduction_seed", -1),
    ("coreset_ratio", 0.0), ("coreset_ratio", 1.5), ("coreset_ratio", float("nan")),
    ("projection_dim", 0), ("coreset_seed", -1), ("k_nearest", 0), ("reweight", 1),
    ("metric", "hamming"), ("layers", ()), ("sigma", -1.0), ("sigma", float("inf")),
    ("crop", 300), ("batch_size", 1.5)])
def test_config_validation(field, value):
  with pytest.raises(ValueError, match=field):
    spade_jax.PatchCoreConfig(**{field: value})
  with pytest.raises(ValueError, match="num_neighbors must be >= 2 with reweight"):
    spade_jax.PatchCoreConfig(reweight=True, num_neighbors=1)


def test_coreset_size():
  assert CONFIG.coreset_size(PATCHES) == BANK
  assert spade_jax.PatchCoreConfig(coreset_ratio=0.001).coreset_size(10) == 1
  assert spade_jax.PatchCoreConfig(coreset_ratio=1.0).coreset_size(10) == 10


# Image scores: the paper's max, its reweighting (reweight=True or image_score), the
# top-k mean of the patch scores.


@pytest.mark.parametrize("settings,b,topk", [
    ({}, None, None), ({"image_score": "max"}, None, None), ({"reweight": True}, 3, None),
    ({"image_score": "reweight"}, 3, None), ({"image_score": "topk", "topk": 5}, None, 5),
    ({"topk": 256}, None, 256)])  # 16 x 16 patches per image: topk=256 is their mean.
def test_image_score_rules_match_numpy_reference(fitted, settings, b, topk):
  patchcore, index, _, test = fitted
  config = spade_jax.PatchCoreConfig(**{**CONFIG.__dict__, **settings})
  scores, maps = spade_jax.PatchCore(patchcore.backbone, config).score(index, test)
  ref_scores, _ = reference_scores(_reference_patches(patchcore, test),
                                   np.asarray(index.bank, np.float64), 1, "l2", b, topk)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
  # The maps do not depend on the image score.
  np.testing.assert_array_equal(maps, patchcore.score(index, test)[1])


def test_reweight_is_image_score_reweight():
  legacy = spade_jax.PatchCoreConfig(reweight=True)
  named = spade_jax.PatchCoreConfig(image_score="reweight")
  assert legacy.reweight and named.reweight  # `reweight` tells whether it applies.
  assert legacy.image_score_rule == named.image_score_rule == "reweight"
  assert legacy.score_settings() == named.score_settings()
  assert spade_jax.PatchCoreConfig().image_score_rule == "max"
  assert spade_jax.PatchCoreConfig(image_score="max").score_settings() == \
      spade_jax.PatchCoreConfig().score_settings()
  assert spade_jax.PatchCoreConfig(topk=3).image_score_rule == "topk"
  assert not spade_jax.PatchCoreConfig(image_score="topk", topk=3).reweight


@pytest.mark.parametrize("settings,message", [
    ({"reweight": True, "image_score": "max"}, "reweight=True .* contradicts image_score='max'"),
    ({"reweight": True, "image_score": "topk", "topk": 3}, "contradicts image_score='topk'"),
    ({"reweight": True, "topk": 3}, "two image scores"),
    ({"image_score": "max", "topk": 3}, "topk=3 is the top-k mean's"),
    ({"image_score": "reweight", "topk": 3}, "not used by image_score='reweight'"),
    ({"image_score": "topk"}, "topk must be set with image_score='topk'"),
    ({"image_score": "mean"}, "image_score must be one of"),
    ({"topk": 0}, "topk must be a positive int"), ({"topk": 2.5}, "topk must be"),
    ({"image_score": "reweight", "num_neighbors": 1}, "num_neighbors must be >= 2 with reweight"),
])
def test_contradicting_image_scores_are_refused(settings, message):
  with pytest.raises(ValueError, match=message):
    spade_jax.PatchCoreConfig(**settings)


def test_topk_above_the_patches_per_image_is_refused(fitted):
  patchcore, index, _, test = fitted
  config = spade_jax.PatchCoreConfig(**{**CONFIG.__dict__, "topk": 257})
  with pytest.raises(ValueError, match=r"topk must be None or an int in \[1, 256\]"):
    spade_jax.PatchCore(patchcore.backbone, config).score(index, test[:1])


def test_thresholds_record_the_image_score():
  # A threshold from before topk (no "topk" key) holds for what it was calibrated on.
  before = {"metric": "l2", "k_nearest": 1, "reweight": False, "coreset_ratio": 0.1,
            "projection_dim": 128, "coreset_seed": 0, "patch_size": 3}

  def threshold(settings):
    return calibration.Threshold(value=1.0, quantile=0.9, folds=2, num_images=4,
                                 settings=settings)

  topk = spade_jax.PatchCoreConfig(image_score="topk", topk=4)
  assert spade_jax.PatchCoreConfig().score_settings() == {**before, "topk": None}
  assert topk.score_settings() == {**before, "topk": 4, "image_score": "topk"}
  threshold(before).check(spade_jax.PatchCoreConfig())
  threshold(before).check(spade_jax.PatchCoreConfig(image_score="max"))
  with pytest.raises(ValueError, match=r"topk=4 \(calibrated with None\)"):
    threshold(before).check(topk)
  reweighted = {**before, "reweight": True, "num_neighbors": 9}
  threshold(reweighted).check(spade_jax.PatchCoreConfig(reweight=True))
  threshold(reweighted).check(spade_jax.PatchCoreConfig(image_score="reweight"))
  with pytest.raises(ValueError, match="reweight=False"):
    threshold(reweighted).check(spade_jax.PatchCoreConfig())
  threshold(topk.score_settings()).check(topk)
  for other, needle in ((spade_jax.PatchCoreConfig(), r"topk=None \(calibrated with 4\)"),
                        (spade_jax.PatchCoreConfig(topk=5), r"topk=5 \(calibrated with 4\)")):
    with pytest.raises(ValueError, match=needle):
      threshold(topk.score_settings()).check(other)


# Levels and reductions.


def _levels_of(backbone, images):
  return {k: np.asarray(v) for k, v in backbone(preprocess(images, resize=72, crop=64)).items()}


def test_default_reduction_is_the_papers():
  config = spade_jax.PatchCoreConfig()
  assert config.reduction == "per_level" and config.embed_dim == 1024
  assert json.loads(config.feature_config("wide_resnet50_2"))["reduction"] == "per_level"


def test_three_levels_reduced_per_level_end_to_end():
  # 6 + 8 + 10 = 24 channels > embed_dim 16: the per-level reduction applies.
  config = spade_jax.PatchCoreConfig(**{**CONFIG.__dict__, "embed_dim": 16,
                                        "layers": ("layer1", "layer2", "layer3")})
  patchcore = spade_jax.PatchCore(FakeBackbone(), config)
  rng = np.random.default_rng(3)
  train, test = _images(rng, 4), _images(rng, 2, defect=True)
  feats = patchcore.extract(train)
  assert feats.shape == (4, 16, 16, 16)
  np.testing.assert_allclose(feats, reference_per_level(_levels_of(patchcore.backbone, train),
                                                        config.layers, 3, 16),
                             rtol=1e-5, atol=1e-5)
  index = patchcore.fit(train)
  scores, _ = patchcore.score(index, test)
  ref_scores, _ = reference_scores(
      reference_per_level(_levels_of(patchcore.backbone, test), config.layers, 3, 16),
      np.asarray(index.bank, np.float64), 1, "l2")
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


def test_adaptive_avg_index_loads_and_scores_as_before(tmp_path):
  # 6 + 8 = 14 channels > embed_dim 8: "adaptive_avg" pools the concatenation, as
  # every index fitted before "per_level" (the default then) does.
  config = spade_jax.PatchCoreConfig(**{**CONFIG.__dict__, "embed_dim": 8,
                                        "reduction": "adaptive_avg"})
  patchcore = spade_jax.PatchCore(FakeBackbone(), config)
  rng = np.random.default_rng(4)
  train, test = _images(rng, 4), _images(rng, 2, defect=True)
  np.testing.assert_allclose(patchcore.extract(test), reference_patch_features(
      _levels_of(patchcore.backbone, test), config.layers, 3, 8), rtol=1e-5, atol=1e-5)
  index = patchcore.fit(train)
  assert json.loads(index.feature_config)["reduction"] == "adaptive_avg"
  scores, maps = patchcore.score(index, test)
  path = tmp_path / "old.patchcore"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=patchcore)
  again, again_maps = patchcore.score(loaded, test)
  np.testing.assert_array_equal(again, scores)
  np.testing.assert_array_equal(again_maps, maps)
  # A detector of the other reduction refuses it: its features are other numbers.
  per_level = spade_jax.PatchCore(FakeBackbone(), spade_jax.PatchCoreConfig(
      **{**config.__dict__, "reduction": "per_level"}))
  with pytest.raises(ValueError, match="refit"):
    spade_jax.load_index(path, expect=per_level)
  with pytest.raises(ValueError, match="refit"):
    per_level.score(loaded, test[:1])
  assert not np.allclose(per_level.extract(test), patchcore.extract(test))
