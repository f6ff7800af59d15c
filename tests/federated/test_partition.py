"""Partitions are disjoint, cover the data, are deterministic and follow the requested skew."""

import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.federated import partition as fp

LABELS = np.random.default_rng(0).integers(0, 10, size=3000).astype(np.int32)


def _assert_disjoint_cover(parts, n):
  joined = np.concatenate(parts)
  assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
  assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("scheme", fp.SCHEMES)
def test_every_scheme_is_disjoint_covering_and_deterministic(scheme):
  a = fp.partition_labels(LABELS, 8, scheme, seed=3, alpha=0.5, classes_per_client=3)
  b = fp.partition_labels(LABELS, 8, scheme, seed=3, alpha=0.5, classes_per_client=3)
  c = fp.partition_labels(LABELS, 8, scheme, seed=4, alpha=0.5, classes_per_client=3)
  _assert_disjoint_cover(a, len(LABELS))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_and_label_mix():
  parts = fp.iid_partition(len(LABELS), 7, seed=0)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  hist = fp.label_histogram(LABELS, parts, 10)
  shares = hist / hist.sum(1, keepdims=True)
  assert np.abs(shares - 0.1).max() < 0.06  # every client sees every class about evenly


def test_iid_with_unequal_proportions():
  parts = fp.iid_partition(1000, 3, seed=0, proportions=[1, 2, 7])
  _assert_disjoint_cover(parts, 1000)
  assert [len(p) for p in parts] == [100, 200, 700]


def _skew(parts):
  """Mean over clients of the largest class's share of the client."""
  hist = fp.label_histogram(LABELS, parts, 10)
  return float(np.mean(hist.max(1) / hist.sum(1)))


def test_dirichlet_skew_follows_alpha_and_min_size():
  skewed = fp.dirichlet_partition(LABELS, 8, alpha=0.1, seed=0, min_size=10)
  mild = fp.dirichlet_partition(LABELS, 8, alpha=100.0, seed=0, min_size=10)
  assert _skew(skewed) > 0.4 > 0.2 > _skew(mild)
  assert min(len(p) for p in skewed) >= 10
  assert len({len(p) for p in skewed}) > 1  # unequal client sizes


def test_dirichlet_min_size_impossible_is_a_user_error():
  with pytest.raises(UserError, match="min_size"):
    fp.dirichlet_partition(LABELS[:40], 8, alpha=0.5, seed=0, min_size=10)


def test_classes_partition_gives_exactly_k_classes_each():
  parts = fp.classes_partition(LABELS, 8, classes_per_client=2, seed=1)
  hist = fp.label_histogram(LABELS, parts, 10)
  assert ((hist > 0).sum(1) == 2).all()
  assert (hist.sum(0) == np.bincount(LABELS, minlength=10)).all()
  # Each class's examples are shared evenly by its holders.
  for c in range(10):
    held = hist[:, c][hist[:, c] > 0]
    assert held.max() - held.min() <= 1


def test_classes_partition_needs_enough_slots():
  with pytest.raises(UserError, match="classes_per_client"):
    fp.classes_partition(LABELS, 4, classes_per_client=2, seed=0)  # 8 slots < 10 classes


def test_bad_scheme_and_too_many_clients():
  with pytest.raises(UserError, match="unknown partition"):
    fp.partition_labels(LABELS, 4, "shards", seed=0)
  with pytest.raises(UserError, match="clients"):
    fp.iid_partition(3, 4, seed=0)


def test_label_histogram_and_table():
  parts = [np.array([0, 1]), np.array([2])]
  labels = np.array([1, 1, 0])
  hist = fp.label_histogram(labels, parts, 2)
  assert hist.tolist() == [[0, 2], [1, 0]]
  text = fp.format_histogram(hist, ("cat", "dog"))
  assert text.splitlines()[0].split() == ["client", "cat", "dog", "total"]
  assert text.splitlines()[-1].split() == ["all", "1", "2", "3"]


def test_participants_are_seeded_distinct_and_sized():
  a = fp.sample_participants(10, 0.3, seed=0, round_index=5)
  assert len(a) == 3 and len(set(a.tolist())) == 3 and a.dtype == np.int32
  assert np.array_equal(a, fp.sample_participants(10, 0.3, seed=0, round_index=5))
  draws = {tuple(fp.sample_participants(10, 0.3, 0, r)) for r in range(20)}
  assert len(draws) > 10
  assert len(fp.sample_participants(10, 0.01, 0, 0)) == 1
  with pytest.raises(UserError, match="participation"):
    fp.sample_participants(10, 0.0, 0, 0)


def test_client_batches_stay_on_the_client_and_walk_its_epochs():
  indices = np.array([5, 9, 11, 40, 41, 77, 90])
  rounds = [fp.client_batch_indices(indices, 0, client=2, round_index=r, local_steps=2,
                                    batch_size=3) for r in range(7)]
  stream = np.concatenate([r.reshape(-1) for r in rounds])  # 42 = 6 epochs of 7
  assert rounds[0].shape == (2, 3) and set(stream) <= set(indices)
  for e in range(6):
    assert sorted(stream[7 * e:7 * (e + 1)]) == sorted(indices)  # each epoch a permutation
  again = fp.client_batch_indices(indices, 0, client=2, round_index=3, local_steps=2, batch_size=3)
  assert np.array_equal(again, rounds[3])
  small = fp.client_batch_indices(np.array([1, 2]), 0, 0, 0, local_steps=1, batch_size=5)
  assert small.shape == (1, 5) and set(small.ravel()) == {1, 2}
