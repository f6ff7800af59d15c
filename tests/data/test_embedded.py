"""The bundled CIFAR-10 subset: present, small, balanced, real CIFAR bytes."""

import hashlib
import importlib.resources
import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

from picpq_jax.data import load_embedded

ASSET = importlib.resources.files("picpq_jax.data") / "assets/cifar10_mini.zip"
SHARED_ZIP = (Path(__file__).resolve().parents[2].parent
              / "shared/data/cifar10/train.zip")
REPO = Path(__file__).resolve().parents[2]


def test_asset_is_a_small_stored_zip():
  with importlib.resources.as_file(ASSET) as path:
    assert 4_000_000 < path.stat().st_size < 6_500_000
    with zipfile.ZipFile(path) as zf:
      infos = zf.infolist()
  assert len(infos) == 5_000
  assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
  assert all(i.filename.startswith("train/") for i in infos)


def test_load_embedded(tmp_path):
  ds = load_embedded(cache_dir=tmp_path)
  assert ds.images.shape == (5_000, 32, 32, 3)
  assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
  np.testing.assert_array_equal(np.bincount(ds.labels), [500] * 10)
  again = load_embedded(cache_dir=tmp_path)
  assert np.array_equal(again.images, ds.images)


def test_asset_copies_shared_bytes_and_script_reproduces_it(tmp_path):
  if not SHARED_ZIP.is_file():
    pytest.skip(f"shared CIFAR-10 zip not found at {SHARED_ZIP}")
  script = REPO / "experiments/data/make_cifar10_mini.py"
  if not script.is_file():
    pytest.skip(f"{script} not found (installed without the repository)")
  spec = importlib.util.spec_from_file_location("make_cifar10_mini", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "mini.zip"
  module.make_mini(SHARED_ZIP, out)
  with importlib.resources.as_file(ASSET) as path:
    shipped = path.read_bytes()
  assert (hashlib.sha256(out.read_bytes()).hexdigest()
          == hashlib.sha256(shipped).hexdigest())
  with zipfile.ZipFile(SHARED_ZIP) as shared, zipfile.ZipFile(out) as mini:
    for name in mini.namelist()[::97]:
      assert mini.read(name) == shared.read(name)
