"""The public API: every advertised name resolves, and the contract names exist."""

import importlib

import pytest

import spade_jax

CONTRACT = ("load_backbone", "BACKBONES", "preprocess", "preprocess_masks", "knn",
            "SpadeConfig", "Spade", "save_index", "load_index", "shard_gallery")


@pytest.mark.parametrize("name", spade_jax.__all__)
def test_every_exported_name_resolves(name):
  assert getattr(spade_jax, name) is not None


def test_contract_names_are_exported():
  assert set(CONTRACT) <= set(spade_jax.__all__)
  assert callable(spade_jax.preprocess)
  # Importing the submodule must not shadow the public function of the same stem.
  importlib.import_module("spade_jax.features.preprocessing")
  assert callable(spade_jax.preprocess)
  assert callable(spade_jax.evaluation.metrics.au_pro)


def test_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    spade_jax.nope  # noqa: B018  (the attribute access is the test)
