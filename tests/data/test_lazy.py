"""LazyImages and the ImageNet transforms: lazy indexing equals eager decoding,
only requested images are decoded, and the crops match hand computations."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from picpq_jax import data as pdata
from picpq_jax.data import lazy as lazy_lib
from picpq_jax.data.lazy import CenterCrop, LazyImages, RandomResizedCrop
from picpq_jax.errors import UserError


class Counting:
  """A record reader over a list of arrays that logs every index it reads."""

  def __init__(self, records):
    self.records, self.reads = records, []

  def __call__(self, i):
    self.reads.append(i)
    return self.records[i]


def _records(n=24, seed=0):
  """``n`` random uint8 RGB images of sizes between 12 and 47 pixels."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (rng.integers(12, 48), rng.integers(12, 48), 3),
                       dtype=np.uint8) for _ in range(n)]


class Scripted:
  """A stand-in for np.random.Generator that returns fixed draws in order."""

  def __init__(self, uniform=(), integers=(), random=()):
    self._uniform, self._integers, self._random = (list(uniform), list(integers),
                                                   list(random))

  def uniform(self, lo, hi):
    value = self._uniform.pop(0)
    assert lo <= value <= hi, (lo, value, hi)
    return value

  def integers(self, lo, hi):
    value = self._integers.pop(0)
    assert lo <= value < hi, (lo, value, hi)
    return value

  def random(self):
    return self._random.pop(0)


def _ramp(height, width):
  """uint8 [H, W, 3] whose channels are linear in (x, y): 2x+y, x+3y, 255-2x-y."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([2 * x + y, x + 3 * y, 255 - 2 * x - y], -1).astype(np.uint8)


def _ramp_expected(top, left, h, w, size):
  """The ramp sampled at the output pixel centers of box (top, left, h, w)."""
  r, c = np.mgrid[0:size, 0:size]
  xs = left + (c + 0.5) * w / size - 0.5
  ys = top + (r + 0.5) * h / size - 0.5
  return np.stack([2 * xs + ys, xs + 3 * ys, 255 - 2 * xs - ys], -1)


# --- Lazy indexing.

def test_lazy_indexing_equals_eager_decoding_for_random_index_sets():
  records = _records()
  eager = np.stack([lazy_lib.center_crop(r, 16, 0.875) for r in records])
  images = LazyImages(Counting(records), len(records), resize=CenterCrop(16, 0.875))
  assert images.shape == (24, 16, 16, 3) and images.dtype == np.uint8
  assert len(images) == 24 and images.ndim == 4
  rng = np.random.default_rng(1)
  for _ in range(5):
    idx = rng.integers(-24, 24, rng.integers(1, 30))  # repeats, negatives
    np.testing.assert_array_equal(images[idx], eager[idx])
  mask = rng.random(24) < 0.5
  np.testing.assert_array_equal(images[mask], eager[mask])
  np.testing.assert_array_equal(images[3:19:4], eager[3:19:4])
  np.testing.assert_array_equal(images[-2], eager[-2])
  np.testing.assert_array_equal(images[5, 2:4, 0], eager[5, 2:4, 0])
  np.testing.assert_array_equal(images[[1, 2], :, 0], eager[[1, 2], :, 0])
  np.testing.assert_array_equal(np.asarray(images), eager)
  np.testing.assert_array_equal(images[np.array([[0, 1], [2, 3]])],
                                eager[np.array([[0, 1], [2, 3]])])


def test_views_compose_without_decoding_and_decode_only_what_is_asked():
  records = _records()
  reader = Counting(records)
  eager = np.stack([lazy_lib.center_crop(r, 8) for r in records])
  images = LazyImages(reader, len(records), resize=CenterCrop(8))
  rng = np.random.default_rng(2)
  a = rng.permutation(24)[:15]
  b = rng.permutation(15)[:9]
  view = images.view(a).view(b).view(np.arange(9) % 2 == 0)
  assert reader.reads == [] and view.shape == (5, 8, 8, 3)
  expected_sources = a[b][::2]
  np.testing.assert_array_equal(view.source_indices, expected_sources)
  out = view[[4, 0, 4]]
  assert sorted(reader.reads) == sorted(expected_sources[[4, 0, 4]].tolist())
  np.testing.assert_array_equal(out, eager[expected_sources[[4, 0, 4]]])


def test_dataset_split_and_batches_on_lazy_images_match_eager():
  records = _records(30)
  labels = (np.arange(30) % 3).astype(np.int32)
  reader = Counting(records)
  lazy_ds = pdata.ImageDataset(
      LazyImages(reader, 30, resize=CenterCrop(12)), labels, ("a", "b", "c"))
  eager_ds = pdata.ImageDataset(np.asarray(lazy_ds.images), labels, ("a", "b", "c"))
  reader.reads.clear()
  lazy_train, lazy_val = pdata.train_val_split(lazy_ds, 7, seed=3)
  eager_train, eager_val = pdata.train_val_split(eager_ds, 7, seed=3)
  assert isinstance(lazy_train.images, LazyImages) and reader.reads == []
  for lazy_b, eager_b in zip(pdata.eval_batches(lazy_val, 4, 0, 1),
                             pdata.eval_batches(eager_val, 4, 0, 1)):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(lazy_b[key], eager_b[key])
  assert len(reader.reads) == 8  # 7 images, and example 0 again for the padding slot
  lazy_it = pdata.iterate_batches(lazy_train, 5, seed=4, process_count=1,
                                  process_index=0)
  eager_it = pdata.iterate_batches(eager_train, 5, seed=4, process_count=1,
                                   process_index=0)
  for _ in range(6):  # past an epoch boundary
    lazy_b, eager_b = next(lazy_it), next(eager_it)
    np.testing.assert_array_equal(lazy_b["image"], eager_b["image"])
    np.testing.assert_array_equal(lazy_b["label"], eager_b["label"])
  with pytest.raises(UserError, match="indices must lie in"):
    lazy_ds.subset([30])


def test_channel_stats_of_lazy_images_equal_the_arrays_and_sample_large_ones(monkeypatch):
  records = _records(20)
  images = LazyImages(Counting(records), 20, resize=CenterCrop(10))
  pixels = np.asarray(images).reshape(-1, 3) / 255.0
  mean, std = pdata.channel_stats(images)
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-5)
  monkeypatch.setattr(pdata.pipeline, "STATS_MAX_LAZY_IMAGES", 3)
  reader = Counting(records)
  pdata.channel_stats(LazyImages(reader, 20, resize=CenterCrop(10)))
  assert sorted(reader.reads) == [0, 10, 19]  # linspace(0, 19, 3), rounded


def test_images_of_another_size_without_resize_are_an_error():
  records = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]
  images = LazyImages(Counting(records), 2, image_shape=(8, 8, 3))
  assert images[0].shape == (8, 8, 3)
  with pytest.raises(UserError, match="pass image_size"):
    images[1]


# --- The evaluation transform.

def test_center_crop_against_pil_resize_then_crop():
  image = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  # size 16, fraction 0.875: shorter side 30 -> round(16 / 0.875) = 18, so
  # 40 x 30 -> round(40 * 18 / 30) = 24 x 18; crop rows 1..17, cols 4..20.
  reference = np.asarray(Image.fromarray(image).resize((24, 18), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(lazy_lib.center_crop(image, 16, 0.875),
                                reference[1:17, 4:20])
  # fraction 1: shorter side 16, 40 x 30 -> 21 x 16 (round(21.33)); cols 2..18.
  reference = np.asarray(Image.fromarray(image).resize((21, 16), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(lazy_lib.center_crop(image, 16), reference[:, 2:18])
  gray = image[..., 0]
  np.testing.assert_array_equal(lazy_lib.center_crop(gray, 16)[..., 2],
                                lazy_lib.center_crop(gray, 16)[..., 0])


def test_center_crop_of_encoded_bytes_and_reduced_scale_jpeg():
  image = np.random.default_rng(6).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(image).save(png, "PNG")
  np.testing.assert_array_equal(lazy_lib.center_crop(png.getvalue(), 16, 0.875),
                                lazy_lib.center_crop(image, 16, 0.875))
  # A smooth 640 x 480 JPEG needed at 64 px decodes at 1/4 scale (160 x 120
  # >= 85 x 64): close to decoding in full, then resizing.
  y, x = np.mgrid[0:480, 0:640]
  smooth = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], -1)
  jpeg = io.BytesIO()
  Image.fromarray(smooth.astype(np.uint8)).save(jpeg, "JPEG", quality=95)
  full = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"))
  reduced = lazy_lib.center_crop(jpeg.getvalue(), 64)
  assert np.abs(reduced.astype(int) - lazy_lib.center_crop(full, 64)).mean() < 2.0


# --- The training transform.

def test_random_resized_crop_box_follows_the_draws_by_hand():
  # 100 x 200 image. Try 1: area 0.5 * 20000 = 10000, aspect exp(0) = 1 ->
  # w = h = 100, top in [0, 1), left drawn 37.
  rng = Scripted(uniform=[0.5, 0.0], integers=[0, 37])
  assert lazy_lib.random_resized_crop_box(rng, 100, 200) == (0, 37, 100, 100)
  # Try 1: area 20000, aspect 4/3 -> w = round(163.3) = 163, h = round(122.5)
  # = 122 > 100: rejected. Try 2: area 0.25 * 20000 = 5000, aspect 3/4 ->
  # w = round(61.2) = 61, h = round(81.6) = 82; top 18, left 139 (<= 200-61).
  rng = Scripted(uniform=[1.0, math.log(4 / 3), 0.25, math.log(3 / 4)],
                 integers=[18, 139])
  assert lazy_lib.random_resized_crop_box(rng, 100, 200) == (18, 139, 82, 61)
  # Ten rejections -> the central box with aspect clamped to 4/3: h = 100,
  # w = round(133.3) = 133, left = (200 - 133) // 2 = 33.
  rng = Scripted(uniform=[1.0, math.log(4 / 3)] * 10)
  assert lazy_lib.random_resized_crop_box(rng, 100, 200) == (0, 33, 100, 133)
  # A square image whose tries all fail keeps the whole image.
  rng = Scripted(uniform=[1.0, math.log(4 / 3)] * 10)
  assert lazy_lib.random_resized_crop_box(rng, 50, 50) == (0, 0, 50, 50)


def test_random_resized_crop_boxes_stay_in_bounds_and_in_range():
  rng = np.random.default_rng(7)
  for height, width in [(100, 100), (60, 150), (300, 40)]:
    for _ in range(300):
      top, left, h, w = lazy_lib.random_resized_crop_box(rng, height, width)
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
      assert h >= 1 and w >= 1
      if (h, w) != (height, width) and (top, left) != ((height - h) // 2, (width - w) // 2):
        # A drawn box: area and aspect in range up to rounding w and h (+-0.5).
        slack = 0.5 / min(h, w)
        assert 0.08 * (1 - slack) ** 2 <= h * w / (height * width) <= 1.0
        assert 3 / 4 * (1 - slack) / (1 + slack) <= w / h <= 4 / 3 * (1 + slack) / (1 - slack)


@pytest.mark.parametrize("box,size", [((5, 10, 24, 30), 12),   # downscale, aspect 5/4
                                      ((3, 20, 18, 18), 24),    # upscale
                                      ((10, 12, 27, 21), 20)])  # aspect 7/9
@pytest.mark.parametrize("flip", [False, True])
def test_random_resized_crop_samples_the_box_like_a_hand_computation(box, size, flip):
  image = _ramp(40, 80)
  top, left, h, w = box
  area_fraction = h * w / (40 * 80)
  # Scripted draws that make this box: area fraction, log aspect, top, left.
  rng = Scripted(uniform=[area_fraction, math.log(w / h)], integers=[top, left],
                 random=[0.25 if flip else 0.75])
  out = lazy_lib.random_resized_crop(image, rng, RandomResizedCrop(size))
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  expected = _ramp_expected(top, left, h, w, size)
  if flip:
    expected = expected[:, ::-1]
  # Bilinear resampling of a linear image gives the ramp at the pixel centers,
  # up to rounding and the discrete filter (a box one pixel off: mean >= 1.5).
  error = np.abs(out - expected)
  assert error.max() <= 1.1 and error.mean() <= 0.55


def test_random_resized_crop_of_the_output_size_copies_the_box():
  image = _ramp(40, 80)
  rng = Scripted(uniform=[16 * 16 / (40 * 80), 0.0], integers=[7, 30], random=[0.9])
  out = lazy_lib.random_resized_crop(image, rng, RandomResizedCrop(16))
  np.testing.assert_array_equal(out, image[7:23, 30:46])
  rng = Scripted(uniform=[16 * 16 / (40 * 80), 0.0], integers=[7, 30], random=[0.1])
  out = lazy_lib.random_resized_crop(image, rng, RandomResizedCrop(16))
  np.testing.assert_array_equal(out, image[7:23, 30:46][:, ::-1])


def test_draw_is_deterministic_per_seed_epoch_and_example():
  records = _records(12)
  augment = RandomResizedCrop(10)
  images = LazyImages(Counting(records), 12, resize=CenterCrop(10)).with_augment(augment)
  view = images.view([9, 4, 7, 2])
  out = view.draw(np.array([0, 2, 1]), seed=5, epoch=3)
  for k, source in enumerate([9, 7, 4]):
    expected = lazy_lib.random_resized_crop(records[source],
                                            np.random.default_rng([5, 3, source]), augment)
    np.testing.assert_array_equal(out[k], expected)
  np.testing.assert_array_equal(view.draw(np.array([1]), 5, 3)[0], out[2])  # any batch
  assert not np.array_equal(view.draw(np.array([0, 2, 1]), 5, 4), out)     # new epoch
  np.testing.assert_array_equal(view[[0]], images[[9]])  # indexing: evaluation images


def test_imagenet_augmentation_batches_are_the_drawn_crops():
  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8)
  labels = np.arange(10, dtype=np.int32) % 2
  ds = pdata.ImageDataset(images, labels, ("a", "b"))
  batched, device_augment = pdata.augmentation("imagenet", ds)
  x = np.ones((2, 20, 20, 3), np.uint8)
  np.testing.assert_array_equal(device_augment(None, x), x)
  np.testing.assert_array_equal(batched.images[[3]], images[[3]])
  batch = next(pdata.iterate_batches(batched, 4, seed=2, process_count=1, process_index=0))
  order = pdata.batch_indices(10, 4, seed=2, epoch=0)[0]
  for k, i in enumerate(order):
    expected = lazy_lib.random_resized_crop(images[i], np.random.default_rng([2, 0, i]),
                                            RandomResizedCrop(20))
    np.testing.assert_array_equal(batch["image"][k], expected)
  np.testing.assert_array_equal(batch["label"], labels[order])
  same, fn = pdata.augmentation("cifar", ds)
  assert same is ds and fn is pdata.augment
  with pytest.raises(UserError, match="unknown augmentation"):
    pdata.augmentation("autoaugment", ds)
  wide = pdata.ImageDataset(images[:, :, :10], labels, ("a", "b"))
  with pytest.raises(UserError, match="square crops"):
    pdata.augmentation("imagenet", wide)


def test_bad_options_are_user_errors(monkeypatch):
  with pytest.raises(UserError, match="center_crop must lie in"):
    CenterCrop(16, 1.5)
  with pytest.raises(UserError, match="scale"):
    RandomResizedCrop(16, scale=(0.5, 0.2))
  with pytest.raises(UserError, match="does not match"):
    LazyImages(Counting([]), 0, resize=CenterCrop(16), augment=RandomResizedCrop(8))
  monkeypatch.setenv("PICPQ_DECODE_THREADS", "zero")
  with pytest.raises(UserError, match="PICPQ_DECODE_THREADS"):
    lazy_lib.default_workers()
  monkeypatch.setenv("PICPQ_DECODE_THREADS", "3")
  assert lazy_lib.default_workers() == 3
  with pytest.raises(UserError, match="cannot decode"):
    lazy_lib.center_crop(b"not an image", 8)
