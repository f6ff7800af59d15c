"""Splitting a dataset across federated clients: IID, Dirichlet over labels, k classes each.

Every function is pure numpy and deterministic per ``seed``. A partition is a list of
``num_clients`` sorted int64 index arrays into the dataset; the arrays are disjoint
and together cover every example (each scheme below guarantees both). Client sizes
may differ (Dirichlet and class-based splits make them differ by design).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from picpq_jax.errors import UserError

SCHEMES = ("iid", "dirichlet", "classes")


def _check_clients(num_clients: int, num_examples: int) -> None:
  if num_clients < 1:
    raise UserError(f"num_clients={num_clients} is out of range: use an integer >= 1")
  if num_examples < num_clients:
    raise UserError(
        f"{num_examples} examples cannot give each of {num_clients} clients one: "
        f"use fewer clients or more data")


def iid_partition(num_examples: int, num_clients: int, seed: int,
                  proportions: Sequence[float] | None = None) -> list[np.ndarray]:
  """Uniformly random, label-blind split.

  Args:
    num_examples: N, the dataset size.
    num_clients: K.
    seed: the permutation is ``np.random.default_rng(seed).permutation(N)``.
    proportions: optional relative client sizes ``[K]`` (positive); default equal
      (sizes then differ by at most one).

  Returns:
    K sorted int64 index arrays, disjoint, covering ``range(N)``.
  """
  _check_clients(num_clients, num_examples)
  order = np.random.default_rng(seed).permutation(num_examples)
  if proportions is None:
    return [np.sort(p) for p in np.array_split(order, num_clients)]
  p = np.asarray(proportions, np.float64)
  if p.shape != (num_clients,) or not np.all(p > 0):
    raise UserError(f"proportions must be {num_clients} positive numbers, got {proportions!r}")
  cuts = np.round(np.cumsum(p / p.sum())[:-1] * num_examples).astype(int)
  parts = np.split(order, cuts)
  if min(len(q) for q in parts) == 0:
    raise UserError("proportions leave a client with no examples: make the smallest larger")
  return [np.sort(q) for q in parts]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 10, max_tries: int = 1000) -> list[np.ndarray]:
  """Label skew by a Dirichlet draw per class (Hsu et al. 2019).

  For each class ``c``, client shares ``q_c ~ Dir(alpha * 1_K)`` cut the class's
  shuffled examples into K consecutive pieces. Small ``alpha`` (0.1) gives each client
  a few dominant classes; large ``alpha`` (100) approaches IID. The whole draw is
  repeated (from the same generator) until every client has at least ``min_size``
  examples.

  Args:
    labels: int [N], class of each example.
    num_clients: K.
    alpha: concentration, > 0.
    seed: seeds ``np.random.default_rng``.
    min_size: smallest acceptable client, >= 1.
    max_tries: redraws before giving up.

  Returns:
    K sorted int64 index arrays, disjoint, covering ``range(N)``.
  """
  labels = np.asarray(labels)
  _check_clients(num_clients, len(labels))
  if not alpha > 0:
    raise UserError(f"alpha={alpha!r} is out of range: use a concentration > 0, e.g. 0.5")
  if not 1 <= min_size <= len(labels) // num_clients:
    raise UserError(
        f"min_size={min_size} is out of range: use 1..{len(labels) // num_clients} for "
        f"{len(labels)} examples over {num_clients} clients")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for k, piece in enumerate(np.split(idx, cuts)):
        parts[k].append(piece)
    merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if min(len(p) for p in merged) >= min_size:
      return merged
  raise UserError(
      f"no Dirichlet({alpha}) draw in {max_tries} tries gave every one of {num_clients} "
      f"clients >= {min_size} examples: raise alpha, lower min_size, or use fewer clients")


def classes_partition(labels: np.ndarray, num_clients: int, classes_per_client: int,
                      seed: int) -> list[np.ndarray]:
  """Each client holds exactly ``classes_per_client`` distinct classes.

  Class slots are dealt in order: slot ``s = k * m + j`` of client ``k`` (``j < m``)
  holds class ``perm[s % C]`` for a seeded permutation ``perm`` of the C classes, so a
  client's classes are distinct and, as ``K * m >= C``, every class has a holder. Each
  class's shuffled examples are then split evenly among its holders.

  Args:
    labels: int [N].
    num_clients: K.
    classes_per_client: m, ``1 <= m <= C`` and ``K * m >= C``.
    seed: seeds ``np.random.default_rng``.

  Returns:
    K sorted int64 index arrays, disjoint, covering ``range(N)``.
  """
  labels = np.asarray(labels)
  _check_clients(num_clients, len(labels))
  classes = np.unique(labels)
  num_classes = len(classes)
  m = classes_per_client
  if not 1 <= m <= num_classes or num_clients * m < num_classes:
    raise UserError(
        f"classes_per_client={m} is out of range for {num_clients} clients and "
        f"{num_classes} classes: use {max(1, -(-num_classes // num_clients))}..{num_classes}")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(classes)
  holders: dict[int, list[int]] = {int(c): [] for c in classes}
  for k in range(num_clients):
    for j in range(m):
      holders[int(perm[(k * m + j) % num_classes])].append(k)
  parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for c in classes:
    idx = rng.permutation(np.flatnonzero(labels == c))
    for k, piece in zip(holders[int(c)], np.array_split(idx, len(holders[int(c)]))):
      parts[k].append(piece)
  merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
  if min(len(p) for p in merged) == 0:
    raise UserError(f"a client got no examples: use fewer than {num_clients} clients")
  return merged


def partition_labels(labels: np.ndarray, num_clients: int, scheme: str, seed: int, *,
              alpha: float = 0.5, classes_per_client: int = 2,
              min_size: int = 10) -> list[np.ndarray]:
  """The partition named by ``scheme`` (``"iid"``, ``"dirichlet"``, ``"classes"``).

  Args:
    labels: int [N].
    num_clients: K.
    scheme: one of :data:`SCHEMES`.
    seed: seeds the split.
    alpha: Dirichlet concentration (``"dirichlet"``).
    classes_per_client: classes per client (``"classes"``).
    min_size: smallest client (``"dirichlet"``).

  Returns:
    K sorted int64 index arrays, disjoint, covering ``range(N)``.
  """
  if scheme == "iid":
    return iid_partition(len(labels), num_clients, seed)
  if scheme == "dirichlet":
    return dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size)
  if scheme == "classes":
    return classes_partition(labels, num_clients, classes_per_client, seed)
  raise UserError(f"unknown partition {scheme!r}: use {', '.join(SCHEMES)}")


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray],
                    num_classes: int) -> np.ndarray:
  """Examples per client and class: int64 ``[K, num_classes]``."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def format_histogram(hist: np.ndarray, class_names: Sequence[str] | None = None) -> str:
  """A plain-text table of a ``[K, C]`` label histogram, one row per client plus totals."""
  hist = np.asarray(hist)
  names = list(class_names) if class_names is not None else [str(c) for c in range(hist.shape[1])]
  header = ["client", *[n[:6] for n in names], "total"]
  rows = [[str(k), *map(str, row), str(row.sum())] for k, row in enumerate(hist)]
  rows.append(["all", *map(str, hist.sum(0)), str(hist.sum())])
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def sample_participants(num_clients: int, fraction: float, seed: int, round_index: int) -> np.ndarray:
  """The clients taking part in one round, in the order the server visits them.

  ``M = max(1, round(fraction * K))`` clients, drawn without replacement by
  ``np.random.default_rng([seed, 7, round_index]).permutation(K)[:M]``: a pure
  function of ``(seed, round_index)``, so a resumed run draws the same clients.

  Returns:
    int32 ``[M]`` client ids.
  """
  if not 0.0 < fraction <= 1.0:
    raise UserError(f"participation={fraction!r} is out of range: use (0, 1]")
  m = participants_per_round(num_clients, fraction)
  order = np.random.default_rng([seed, 7, round_index]).permutation(num_clients)
  return order[:m].astype(np.int32)


def participants_per_round(num_clients: int, fraction: float) -> int:
  """``max(1, round(fraction * num_clients))``."""
  return max(1, int(round(fraction * num_clients)))


def client_batch_indices(indices: np.ndarray, seed: int, client: int, round_index: int,
                         local_steps: int, batch_size: int) -> np.ndarray:
  """The examples a client trains on in one round: int64 ``[local_steps, batch_size]``.

  Each client reads its own endless stream: epoch ``e`` of client ``k`` is its
  ``indices`` in the order ``np.random.default_rng([seed, k, e]).permutation(n_k)``.
  Round ``r`` takes stream positions ``r * E * B`` to ``(r + 1) * E * B - 1``, as if the
  client took part in every round, so the batches depend on ``(seed, k, r)`` only.
  A client with fewer than ``B`` examples wraps into its next epoch.
  """
  indices = np.asarray(indices)
  n = len(indices)
  pos = round_index * local_steps * batch_size + np.arange(local_steps * batch_size)
  epochs = pos // n
  out = np.empty(pos.shape, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    order = np.random.default_rng([seed, client, int(e)]).permutation(n)
    out[sel] = indices[order[pos[sel] % n]]
  return out.reshape(local_steps, batch_size)
