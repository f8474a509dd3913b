"""JAX's persistent compilation cache as the scripts set it up
(spade_jax.host.compilation_cache, --compilation_cache_dir): where it goes, that it
gets entries, how it is turned off. Whether a warm run is faster is measured by the
benchmark (experiments/bench/pipeline.py), never asserted here."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from spade_jax.host import compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(name="restore_jax_config")
def fixture_restore_jax_config():
  """The cache settings of this process are put back after the test."""
  saved = {name: getattr(jax.config, name) for name in _OPTIONS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache._reset()  # pylint: disable=protected-access


def test_resolve(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.CACHE_ENV, raising=False)
  monkeypatch.setenv("SPADE_JAX_CACHE", str(tmp_path / "home"))
  default = tmp_path / "home" / "jax_compilation_cache"
  assert compilation_cache.default_dir() == default
  assert compilation_cache.resolve(None) == default
  for off in ("", "none", "None", " NONE "):
    assert compilation_cache.resolve(off) is None
  assert compilation_cache.resolve(tmp_path / "x") == tmp_path / "x"
  monkeypatch.setenv(compilation_cache.CACHE_ENV, str(tmp_path / "env"))
  assert compilation_cache.resolve(None) == tmp_path / "env"
  monkeypatch.setenv(compilation_cache.CACHE_ENV, "none")
  assert compilation_cache.resolve(None) is None


def test_enable_stores_compiled_programs(tmp_path, restore_jax_config):
  del restore_jax_config
  folder = tmp_path / "cache"
  assert compilation_cache.enable(folder) == folder
  assert jax.config.jax_compilation_cache_dir == str(folder)
  # A program compiled in well under JAX's default 1 s threshold is stored too.
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 7.0)
  np.testing.assert_allclose(f(np.arange(5.0, dtype=np.float32)),
                             np.sin(np.arange(5.0)) * 3 + 7, rtol=1e-6)
  assert compilation_cache.cache_entries(folder)
  assert compilation_cache.enable("none") is None
  assert not jax.config.jax_enable_compilation_cache


def test_unusable_folders(tmp_path, monkeypatch, restore_jax_config):
  del restore_jax_config
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="--compilation_cache_dir") as e:
    compilation_cache.enable(blocker / "cache")
  assert str(blocker) in str(e.value)
  with pytest.raises(ValueError, match="is a file"):
    compilation_cache.enable(blocker)
  # The default folder unusable: a warning and no cache, not an error.
  monkeypatch.delenv(compilation_cache.CACHE_ENV, raising=False)
  monkeypatch.setenv("SPADE_JAX_CACHE", str(blocker))
  assert compilation_cache.enable(None) is None
  # Named by the environment: an error, like the flag.
  monkeypatch.setenv(compilation_cache.CACHE_ENV, str(blocker / "cache"))
  with pytest.raises(ValueError):
    compilation_cache.enable(None)


def _run(script, *args, env=None):
  full = dict(os.environ, JAX_PLATFORMS="cpu")
  full.pop("XLA_FLAGS", None)
  full.pop(compilation_cache.CACHE_ENV, None)  # The scripts' own default.
  full.update(env or {})
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args],
                        capture_output=True, text=True, env=full, timeout=300, check=False)


@pytest.fixture(name="train_dir", scope="module")
def fixture_train_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("train")
  for i in range(2):
    image = np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)
    PIL.Image.fromarray(image).save(folder / f"{i}.png")
  return folder


_FIT = ("--weights=none", "--k_images=1", "--k_image_score=1", "--resize=32", "--crop=32",
        "--layers=layer1")


@pytest.mark.slow
def test_scripts_fill_the_default_cache_folder(train_dir, tmp_path):
  home = tmp_path / "home"
  fit = _run("fit.py", f"--train_dir={train_dir}", f"--index={tmp_path / 'i.spade'}", *_FIT,
             env={"SPADE_JAX_CACHE": str(home)})
  assert fit.returncode == 0, fit.stderr[-3000:]
  entries = compilation_cache.cache_entries(home / "jax_compilation_cache")
  assert entries
  predict = _run("predict.py", f"--index={tmp_path / 'i.spade'}", f"--images={train_dir}",
                 f"--output_dir={tmp_path / 'out'}", "--num_summary=0",
                 env={"SPADE_JAX_CACHE": str(home)})
  assert predict.returncode == 0, predict.stderr[-3000:]
  # The backbone at this batch shape was compiled by fit.py already: predict.py adds
  # its search and maps to the same folder.
  assert len(compilation_cache.cache_entries(home / "jax_compilation_cache")) > len(entries)


@pytest.mark.slow
def test_named_folder_and_off(train_dir, tmp_path):
  home, named = tmp_path / "home", tmp_path / "named"
  fit = _run("fit.py", f"--train_dir={train_dir}", f"--index={tmp_path / 'i.spade'}", *_FIT,
             f"--compilation_cache_dir={named}", env={"SPADE_JAX_CACHE": str(home)})
  assert fit.returncode == 0, fit.stderr[-3000:]
  assert compilation_cache.cache_entries(named)
  assert not (home / "jax_compilation_cache").exists()
  off = _run("fit.py", f"--train_dir={train_dir}", f"--index={tmp_path / 'j.spade'}", *_FIT,
             "--compilation_cache_dir=none", env={"SPADE_JAX_CACHE": str(home)})
  assert off.returncode == 0, off.stderr[-3000:]
  assert not (home / "jax_compilation_cache").exists()


@pytest.mark.slow
def test_unusable_folder_is_a_clear_script_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = _run("predict.py", f"--index={tmp_path / 'i.spade'}", f"--images={tmp_path}",
              f"--output_dir={tmp_path / 'out'}", f"--compilation_cache_dir={blocker}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "predict.py: error:" in proc.stderr and str(blocker) in proc.stderr


@pytest.mark.parametrize("script", ["evaluate.py", "evaluate_stc.py", "fit.py", "predict.py",
                                    "benchmark.py"])
@pytest.mark.slow
def test_every_script_has_the_flag(script):
  proc = _run(script, "--help")  # absl's --help exits with status 1.
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "--compilation_cache_dir" in proc.stdout and "none" in proc.stdout
