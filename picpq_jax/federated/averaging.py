"""Federated averaging: sample-weighted means of client pytrees over a mesh axis."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def fedavg_weights(counts: Any) -> np.ndarray:
  """Averaging weights from client sample counts ``n_k``: ``n_k / sum(n)``, float64 ``[K]``."""
  counts = np.asarray(counts, np.float64)
  return counts / counts.sum()


def weighted_average(tree: Any, weights: Array, axis_name: str | None = None) -> Any:
  """``sum_k w_k x_k / sum_k w_k`` over clients, leaf by leaf.

  Inside ``shard_map``, each device holds ``C`` of the clients stacked on a leading
  axis; the local weighted sums are added across devices with ``psum`` over
  ``axis_name``, so every device gets the same average of all clients. Outside a
  mesh (``axis_name=None``) only the leading axis is reduced.

  Args:
    tree: pytree with leaves ``[C, ...]``. Float leaves are averaged (accumulated in
      float32 or wider); integer leaves (step counters, equal on every client) take
      the maximum.
    weights: float ``[C]``, non-negative (e.g. client sample counts; zero drops a
      client), not all zero across the axis.
    axis_name: the mesh axis the clients are sharded over, or ``None``.

  Returns:
    Pytree of ``tree``'s structure with leaves ``[...]`` and the leaves' dtypes.
  """
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(weights)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)

  def average(x):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      m = jnp.max(x, axis=0)
      return m if axis_name is None else jax.lax.pmax(m, axis_name)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(acc)
    s = jnp.sum(w * x.astype(acc), axis=0)
    if axis_name is not None:
      s = jax.lax.psum(s, axis_name)
    return (s / total.astype(acc)).astype(x.dtype)

  return jax.tree.map(average, tree)
