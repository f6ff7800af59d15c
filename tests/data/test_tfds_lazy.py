"""Lazy tfds datasets, offline: a real ArrayRecord dataset of JPEGs built here
(tfds writes encoded images without TensorFlow) and tfds mock data; and a tiny
end-to-end `picpq train --augment imagenet --image-size 32` through it."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from picpq_jax import cli
from picpq_jax import data as pdata
from picpq_jax.data import lazy as lazy_lib
from picpq_jax.data import tfds_source
from picpq_jax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")

NAME = "picpq_tiny_jpegs"
NUM = 14


class PicpqTinyJpegs(tfds.core.GeneratorBasedBuilder):
  """14 JPEGs of random sizes 20-35 (one grayscale), 3 classes: ImageNet's layout."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file to look for (and no importlib_resources needed)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(NUM):
      h, w = rng.integers(20, 36, 2)  # < 2 x 18: no reduced-scale JPEG decoding at 16
      pixels = rng.integers(0, 256, (h, w) if i == 3 else (h, w, 3), dtype=np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels).save(buf, "JPEG", quality=90)
      yield i, {"image": buf.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  """A data_dir holding picpq_tiny_jpegs in array_record format."""
  root = tmp_path_factory.mktemp("tfds")
  PicpqTinyJpegs(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


def _reference(image, size, fraction):
  """Resize (PIL bilinear) the shorter side to round(size / fraction), crop the
  center ``size`` square: computed here from tfds' own decoding."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image).convert("RGB")
  short = round(size / fraction)
  w, h = pil.size
  new_w, new_h = max(short, round(w * short / min(w, h))), max(short, round(h * short / min(w, h)))
  resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]


def test_lazy_array_record_equals_eager_and_tfds_decoding(jpeg_dir, tmp_path):
  lazy = pdata.load_tfds(NAME, data_dir=jpeg_dir, image_size=16, center_crop=0.875,
                         lazy=True, cache_dir=tmp_path)
  eager = pdata.load_tfds(NAME, data_dir=jpeg_dir, image_size=16, center_crop=0.875,
                          lazy=False)
  assert isinstance(lazy.images, pdata.LazyImages) and isinstance(eager.images, np.ndarray)
  assert lazy.images.shape == eager.images.shape == (NUM, 16, 16, 3)
  decoded = tfds.data_source(NAME, split="train", data_dir=jpeg_dir)  # tfds' PIL decoding
  np.testing.assert_array_equal(lazy.labels, [decoded[i]["label"] for i in range(NUM)])
  np.testing.assert_array_equal(lazy.labels, eager.labels)
  for i in range(NUM):
    np.testing.assert_array_equal(eager.images[i], _reference(decoded[i]["image"], 16, 0.875))
  rng = np.random.default_rng(0)
  for _ in range(4):
    idx = rng.integers(0, NUM, rng.integers(1, 20))
    np.testing.assert_array_equal(lazy.images[idx], eager.images[idx])
    sub = rng.permutation(NUM)[:7]
    np.testing.assert_array_equal(lazy.subset(sub).images[idx % 7], eager.images[sub][idx % 7])


def test_only_requested_images_are_decoded(jpeg_dir, tmp_path, monkeypatch):
  opened = []
  real_open = lazy_lib.open_image
  monkeypatch.setattr(lazy_lib, "open_image", lambda r: opened.append(1) or real_open(r))
  ds = pdata.load_tfds(NAME, data_dir=jpeg_dir, image_size=8, lazy=True, cache_dir=tmp_path)
  train, val = pdata.train_val_split(ds, 4, seed=0)
  train.subset([5, 1, 2]).subset([0, 2])
  assert opened == []  # reading labels and splitting decode nothing
  val.images[[3, 0]]
  assert len(opened) == 2
  batch = next(pdata.iterate_batches(pdata.augmentation("imagenet", train)[0], 4, seed=1,
                                     process_count=1, process_index=0))
  assert batch["image"].shape == (4, 8, 8, 3) and len(opened) == 6


def test_labels_of_lazy_datasets_are_cached(jpeg_dir, tmp_path, monkeypatch):
  first = pdata.load_tfds(NAME, data_dir=jpeg_dir, image_size=8, lazy=True, cache_dir=tmp_path)
  assert len(list((tmp_path / "tfds_labels").glob("*.npy"))) == 1
  sliced = pdata.load_tfds(NAME, split="train[:5]", data_dir=jpeg_dir, image_size=8,
                           lazy=True, cache_dir=tmp_path)  # another split, another file
  np.testing.assert_array_equal(sliced.labels, first.labels[:5])
  assert len(list((tmp_path / "tfds_labels").glob("*.npy"))) == 2

  def no_reading(*args):
    raise AssertionError("labels read again")

  monkeypatch.setattr(tfds_source, "_read_labels", no_reading)
  again = pdata.load_tfds(NAME, data_dir=jpeg_dir, image_size=8, lazy=True, cache_dir=tmp_path)
  np.testing.assert_array_equal(again.labels, first.labels)


def test_size_decides_lazy_unless_told(monkeypatch, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    eager = pdata.load_dataset("tfds:cifar10", cache_dir=tmp_path)
    assert isinstance(eager.images, np.ndarray)  # 6 x 3 KB < LAZY_BYTES
    monkeypatch.setattr(tfds_source, "LAZY_BYTES", 6 * 32 * 32 * 3 - 1)
    lazy = pdata.load_dataset("tfds:cifar10", cache_dir=tmp_path)
    forced = pdata.load_dataset("tfds:cifar10", cache_dir=tmp_path, lazy=False)
  assert isinstance(lazy.images, pdata.LazyImages) and lazy.images.shape == (6, 32, 32, 3)
  assert isinstance(forced.images, np.ndarray)
  np.testing.assert_array_equal(np.asarray(lazy.images), eager.images)
  np.testing.assert_array_equal(lazy.labels, eager.labels)


def test_mock_imagenet_lazy_equals_eager(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    lazy = pdata.load_tfds("imagenet2012", split="validation", image_size=24,
                           center_crop=0.875, lazy=True, cache_dir=tmp_path)
    eager = pdata.load_tfds("imagenet2012", split="validation", image_size=24,
                            center_crop=0.875, lazy=False)
    decoded = tfds.data_source("imagenet2012", split="validation")
    expected = np.stack([_reference(decoded[i]["image"], 24, 0.875) for i in range(10)])
  np.testing.assert_array_equal(eager.images, expected)
  idx = np.array([9, 0, 4, 4, 7])
  np.testing.assert_array_equal(lazy.images[idx], expected[idx])
  assert lazy.num_classes == 1000


def test_bad_center_crop():
  with pytest.raises(UserError, match="center_crop must lie in"):
    pdata.load_tfds("cifar10", image_size=8, center_crop=0.0)


def test_train_config_checks_augment_and_image_size():
  from picpq_jax.train import TrainConfig
  from picpq_jax.train.config import AUGMENTATIONS
  assert AUGMENTATIONS == pdata.AUGMENTATIONS == tuple(pdata.EVAL_CENTER_CROP)
  assert TrainConfig().augment == "cifar" and TrainConfig().image_size is None
  with pytest.raises(UserError, match="--augment='autoaugment'"):
    TrainConfig(augment="autoaugment")
  with pytest.raises(UserError, match="--image-size=0"):
    TrainConfig(image_size=0)


def test_train_cli_on_lazy_mock_imagenet(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "LAZY_BYTES", 0)  # 32 mock images: lazy anyway
  crops = []
  real_crop = lazy_lib.random_resized_crop
  monkeypatch.setattr(lazy_lib, "random_resized_crop",
                      lambda *a: crops.append(1) or real_crop(*a))
  workdir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=32):
    code = cli.main(["train", "--arch", "resnet8", "--data", "tfds:imagenet2012",
                     "--image-size", "32", "--augment", "imagenet", "--val-size", "8",
                     "--epochs", "1", "--batch-size", "8", "--workdir", str(workdir),
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
  assert code == 0
  with open(workdir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["num_train"] == 24 and results["num_val"] == 8 and results["steps"] == 3
  assert np.isfinite(results["val_loss"])
  assert len(crops) == 3 * 8  # every training image drawn on the host, once
  with open(workdir / "config.json", encoding="utf-8") as f:
    assert json.load(f)["augment"] == "imagenet"
  assert os.path.isdir(tmp_path / "cache" / "tfds_labels")
