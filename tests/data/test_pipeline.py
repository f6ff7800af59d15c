"""Tests for the input pipeline: split, stats, augmentation and batching."""

import itertools

import jax
import numpy as np
import pytest

from picpq_jax.data import CIFAR10_MEAN
from picpq_jax.data import CIFAR10_STD
from picpq_jax.data import ImageDataset
from picpq_jax.data import augment
from picpq_jax.data import batch_indices
from picpq_jax.data import channel_stats
from picpq_jax.data import eval_batches
from picpq_jax.data import iterate_batches
from picpq_jax.data import normalize
from picpq_jax.data import steps_per_epoch
from picpq_jax.data import train_val_split
from picpq_jax.errors import UserError


def _dataset(n=50, size=2):
  """Image ``i`` is filled with ``i`` (so batches reveal their indices)."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()
  return ImageDataset(images, np.arange(n, dtype=np.int32) % 5,
                      tuple("abcde"))


def _ids(batch):
  return batch["image"][:, 0, 0, 0].astype(np.int64)


# train_val_split


def test_split_is_disjoint_covering_and_seeded():
  ds = _dataset(50)
  train, val = train_val_split(ds, 10, seed=3)
  train_ids, val_ids = _ids({"image": train.images}), _ids({"image":
                                                           val.images})
  assert len(train) == 40 and len(val) == 10
  assert set(train_ids).isdisjoint(val_ids)
  assert sorted(np.concatenate([train_ids, val_ids])) == list(range(50))
  expected_val = np.sort(np.random.default_rng(3).permutation(50)[-10:])
  np.testing.assert_array_equal(val_ids, expected_val)
  np.testing.assert_array_equal(val.labels, ds.labels[expected_val])
  again_train, again_val = train_val_split(ds, 10, seed=3)
  np.testing.assert_array_equal(again_val.images, val.images)
  np.testing.assert_array_equal(again_train.images, train.images)
  _, other = train_val_split(ds, 10, seed=4)
  assert not np.array_equal(other.images, val.images)


def test_split_sizes_at_the_edges():
  train, val = train_val_split(_dataset(5), 0, seed=0)
  assert len(train) == 5 and len(val) == 0
  train, val = train_val_split(_dataset(5), 4, seed=0)
  assert len(train) == 1 and len(val) == 4
  for bad in (5, 6, -1):
    with pytest.raises(UserError, match="val_size must lie in"):
      train_val_split(_dataset(5), bad, seed=0)
  with pytest.raises(UserError, match="seed must be a non-negative int"):
    train_val_split(_dataset(5), 1, seed=-1)


# channel_stats and normalize


def test_channel_stats_hand_computed():
  images = np.zeros((2, 1, 2, 3), np.uint8)
  images[0, 0, :, 0] = 255  # R: 255, 255, 0, 0 -> mean 0.5, std 0.5
  images[:, 0, 0, 1] = 51  # G: 51, 0, 51, 0 -> mean 0.1, std 0.1
  images[..., 2] = 102  # B: constant 0.4, std 0
  mean, std = channel_stats(images)
  assert mean.dtype == np.float32 and std.shape == (3,)
  np.testing.assert_allclose(mean, [0.5, 0.1, 0.4], rtol=1e-6)
  np.testing.assert_allclose(std, [0.5, 0.1, 0.0], atol=1e-7)
  with pytest.raises(UserError, match="uint8 images"):
    channel_stats(images.astype(np.float32))


def test_normalize():
  images = np.array([[[[0, 255, 51]]]], np.uint8)
  out = normalize(images, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
  assert out.dtype == np.float32 and out.shape == (1, 1, 1, 3)
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
  cifar = normalize(np.full((2, 4, 4, 3), 128, np.uint8), CIFAR10_MEAN,
                    CIFAR10_STD)
  np.testing.assert_allclose(
      cifar[1, 2, 3], (128 / 255 - np.array(CIFAR10_MEAN)) / CIFAR10_STD,
      rtol=1e-5)


# augment


def _candidates(image, padding):
  """Every crop of the zero-padded ``image`` [H, W, C], plain and mirrored:
  [2 * (2p + 1)^2, H, W, C] in (flip, dy, dx) order."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = [padded[dy:dy + h, dx:dx + w]
           for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
  return np.stack(crops + [c[:, ::-1] for c in crops])


def test_augment_outputs_are_crops_and_cover_all_offsets():
  """Each output is exactly one padded crop of its own input, maybe mirrored;
  over many images all 81 offsets and both flips occur."""
  n, padding = 3000, 4
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (n, 8, 8, 3), dtype=np.uint8)  # No zeros.
  out = np.asarray(augment(jax.random.key(0), images))
  assert out.shape == images.shape and out.dtype == np.uint8
  seen = []
  for start in range(0, n, 500):
    cands = np.stack([_candidates(im, padding)
                      for im in images[start:start + 500]])
    match = (cands == out[start:start + 500, None]).all(axis=(2, 3, 4))
    assert (match.sum(1) == 1).all(), "an output is not a unique crop"
    seen.append(match.argmax(1))
  seen = np.concatenate(seen)
  assert len(np.unique(seen)) == 2 * 81  # Every (flip, dy, dx) occurred.


def test_augment_matches_numpy_transcription():
  """The offsets and flips are derived from the key as documented."""
  key = jax.random.key(7)
  images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3),
                                             dtype=np.uint8)
  out = np.asarray(augment(key, images))
  k_y, k_x, k_flip = jax.random.split(key, 3)
  dy = np.asarray(jax.random.randint(k_y, (64,), 0, 9))
  dx = np.asarray(jax.random.randint(k_x, (64,), 0, 9))
  flip = np.asarray(jax.random.bernoulli(k_flip, 0.5, (64,)))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(64):
    crop = padded[i, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
    np.testing.assert_array_equal(out[i], crop[:, ::-1] if flip[i] else crop)


def test_augment_is_deterministic_float_ok_and_compiles_once():
  images = np.random.default_rng(2).random((16, 6, 6, 3)).astype(np.float32)
  a = augment(jax.random.key(1), images)
  assert a.dtype == np.float32
  np.testing.assert_array_equal(a, augment(jax.random.key(1), images))
  assert not np.array_equal(a, augment(jax.random.key(2), images))
  size = augment._cache_size()  # pylint: disable=protected-access
  augment(jax.random.key(3), images)
  augment(jax.random.key(4), images + 1)
  assert augment._cache_size() == size  # pylint: disable=protected-access
  jitted = jax.jit(lambda k, x: augment(k, x, padding=2))
  assert jitted(jax.random.key(1), images).shape == images.shape


# batch_indices


def test_batch_indices_per_epoch():
  first = batch_indices(10, 3, seed=0, epoch=0)
  assert first.shape == (3, 3) and first.dtype == np.int64
  assert len(set(first.ravel())) == 9
  np.testing.assert_array_equal(
      first.ravel(), np.random.default_rng([0, 0]).permutation(10)[:9])
  np.testing.assert_array_equal(first, batch_indices(10, 3, seed=0, epoch=0))
  assert not np.array_equal(first, batch_indices(10, 3, seed=0, epoch=1))
  assert not np.array_equal(first, batch_indices(10, 3, seed=1, epoch=0))
  np.testing.assert_array_equal(
      batch_indices(7, 2, 0, 0, shuffle=False), [[0, 1], [2, 3], [4, 5]])
  kept = batch_indices(7, 3, 5, 2, drop_remainder=False)
  assert kept.shape == (3, 3)
  np.testing.assert_array_equal(kept[-1, 1:], [-1, -1])
  assert sorted(kept[kept >= 0]) == list(range(7))


def test_batch_indices_errors():
  with pytest.raises(UserError, match="exceeds the 4 examples"):
    batch_indices(4, 8, 0, 0)
  with pytest.raises(UserError, match="batch_size must be positive"):
    batch_indices(4, 0, 0, 0)
  assert steps_per_epoch(10, 3) == 3
  assert steps_per_epoch(10, 3, drop_remainder=False) == 4


# iterate_batches


def test_iterate_batches_steps_and_epochs():
  ds = _dataset(10)
  batches = list(itertools.islice(iterate_batches(ds, 3, seed=0,
                                                  process_count=1,
                                                  process_index=0), 7))
  assert all(b["image"].shape == (3, 2, 2, 3) and b["image"].dtype == np.uint8
             for b in batches)
  assert all(b["label"].dtype == np.int32 and "mask" not in b
             for b in batches)
  for epoch in (0, 1):
    order = batch_indices(10, 3, 0, epoch)
    for b in range(3):
      np.testing.assert_array_equal(_ids(batches[3 * epoch + b]), order[b])
      np.testing.assert_array_equal(batches[3 * epoch + b]["label"],
                                    ds.labels[order[b]])
  np.testing.assert_array_equal(_ids(batches[6]), batch_indices(10, 3, 0,
                                                                2)[0])


def test_iterate_batches_same_seed_same_batches_and_resume():
  ds = _dataset(23)
  kwargs = dict(process_count=1, process_index=0)
  run = [_ids(b) for b in itertools.islice(iterate_batches(ds, 4, 9,
                                                           **kwargs), 20)]
  again = [_ids(b) for b in itertools.islice(iterate_batches(ds, 4, 9,
                                                             **kwargs), 20)]
  np.testing.assert_array_equal(run, again)
  for k in (0, 1, 5, 6, 13):
    resumed = iterate_batches(ds, 4, 9, start_step=k, **kwargs)
    tail = [_ids(b) for b in itertools.islice(resumed, 20 - k)]
    np.testing.assert_array_equal(tail, run[k:])
  other = [_ids(b) for b in itertools.islice(iterate_batches(ds, 4, 10,
                                                             **kwargs), 20)]
  assert not np.array_equal(other, run)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_host_slices_partition_the_global_batch(drop_remainder):
  ds = _dataset(30)
  steps = 9
  whole = list(itertools.islice(iterate_batches(
      ds, 8, 1, drop_remainder=drop_remainder, process_count=1,
      process_index=0), steps))
  hosts = [list(itertools.islice(iterate_batches(
      ds, 8, 1, drop_remainder=drop_remainder, process_count=4,
      process_index=p), steps)) for p in range(4)]
  for step in range(steps):
    parts = [hosts[p][step] for p in range(4)]
    assert all(part["image"].shape[0] == 2 for part in parts)
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in parts]), whole[step][key])


def test_keeping_the_remainder_masks_padding():
  ds = _dataset(10)
  batches = list(itertools.islice(iterate_batches(
      ds, 4, 0, drop_remainder=False, process_count=1, process_index=0), 3))
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 10 and not masks[-2:].any()
  ids = np.concatenate([_ids(b) for b in batches])[masks]
  assert sorted(ids) == list(range(10))
  np.testing.assert_array_equal(batches[-1]["image"][2:], 0)


def test_iterate_batches_errors():
  ds = _dataset(10)
  with pytest.raises(UserError, match="multiple of the 3 processes"):
    iterate_batches(ds, 4, 0, process_count=3, process_index=0)
  with pytest.raises(UserError, match="process_index must lie"):
    iterate_batches(ds, 4, 0, process_count=2, process_index=2)
  with pytest.raises(UserError, match="start_step must be non-negative"):
    iterate_batches(ds, 4, 0, start_step=-1)
  with pytest.raises(UserError, match="exceeds the 10 examples"):
    iterate_batches(ds, 16, 0)


def test_iterate_batches_defaults_to_this_process():
  batch = next(iterate_batches(_dataset(10), 4, 0))
  assert batch["image"].shape[0] == 4 // jax.process_count()


# eval_batches


@pytest.mark.parametrize("n, batch_size, hosts", [(10, 4, 1), (10, 4, 2),
                                                  (12, 4, 4), (3, 8, 2),
                                                  (0, 4, 1)])
def test_eval_batches_cover_each_example_once(n, batch_size, hosts):
  ds = _dataset(n) if n else _dataset(1).subset([])
  seen, count = [], 0
  for p in range(hosts):
    batches = list(eval_batches(ds, batch_size, process_index=p,
                                process_count=hosts))
    assert len(batches) == -(-n // batch_size)
    for b in batches:
      assert b["image"].shape[0] == batch_size // hosts
      assert b["mask"].dtype == np.bool_
      seen += list(_ids(b)[b["mask"]])
      np.testing.assert_array_equal(b["label"][b["mask"]],
                                    ds.labels[_ids(b)[b["mask"]]])
      count += int(b["mask"].sum())
  assert sorted(seen) == list(range(n)) and count == n


def test_eval_batches_keep_order_and_weights_sum_correctly():
  ds = _dataset(10)
  batches = list(eval_batches(ds, 4, process_index=0, process_count=1))
  ids = np.concatenate([_ids(b) for b in batches])
  np.testing.assert_array_equal(ids[:10], np.arange(10))
  correct = sum(float(np.sum((b["label"] == 0) * b["mask"])) for b in batches)
  assert correct == 2  # Labels 0 at indices 0 and 5; padding not counted.
