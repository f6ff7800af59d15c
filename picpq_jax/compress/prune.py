"""Global pruning to a cost budget (DESIGN.md section 3).

All channels of all groups are ranked together by importance (higher = keep); the
lowest are removed until the network's cost falls under the target, never going
below a safeguard number of channels in any group. The importances are traced: the
pruner has fixed shapes and no data-dependent Python control flow, so it runs under
``jit`` and ``vmap`` over many ``(a, b)`` candidates of the evolutionary search with
one compiled program.

Algorithm. Per group of ``C`` channels, the ``keep_min = min(C, max(min_channels,
ceil(safeguard * C)))`` most important channels are protected: never candidates. The
other ``U`` channels (``U`` is static: it depends only on the group sizes) are
ranked globally by importance, ascending. The cost after removing the ``k`` lowest
never increases with ``k``, so the smallest ``k`` whose cost is under the budget is
found by bisection over ``[0, U]``: ``bit_length(U) + 1`` evaluations of the cost
model from per-group kept counts inside a ``lax.fori_loop``.

Ties. Channel ``i`` outranks channel ``j`` when ``I_i > I_j``, or ``I_i == I_j`` and
``i`` comes first in flat order (groups in ``structure.groups`` order, channels in
order). So equal importances keep the first channels of a group: protection goes to
the first, removal starts from the last.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from picpq_jax.compress import cost_model as cost_lib
from picpq_jax.errors import UserError
from picpq_jax.models.structure import ModelStructure

Array = jax.Array


class PruneResult(NamedTuple):
  """What :func:`prune_to_budget` returns (leading ``[B]`` on every leaf under ``vmap``)."""

  masks: dict[str, Array]  # {group: float32 [C]}, 1 = kept
  cost: cost_lib.Cost  # of the pruned network at the given ``quant``; float32 scalars
  reached: Array  # bool []: cost under the budget; False when the safeguard stopped first
  num_removed: Array  # int32 []: channels removed, all groups together


def safeguard_channels(size: int, safeguard: float, min_channels: int) -> int:
  """Channels a group of ``size`` always keeps (its ``keep_min``).

  ``min(size, max(min_channels, ceil(safeguard * size)))``, where ``safeguard * size``
  is rounded to 9 decimals before the ceiling, so 10% of 30 channels is 3, not 4
  (``0.1 * 30 == 3.0000000000000004`` in floating point).
  """
  return min(size, max(min_channels, math.ceil(round(safeguard * size, 9))))


def _check_args(target: Any, metric: str, safeguard: float, min_channels: int) -> None:
  """UserErrors for out-of-range settings; ``target`` is checked only when concrete."""
  cost_lib.check_metric(metric)
  if not 0.0 <= safeguard <= 1.0:
    raise UserError(f"safeguard={safeguard} is outside [0, 1]: it is the fraction of each "
                    f"group's channels that is always kept (reference 0.1)")
  if int(min_channels) != min_channels or min_channels < 1:
    raise UserError(f"min_channels={min_channels} must be an integer >= 1 (reference 2)")
  try:
    value = float(target)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # traced: cannot be checked here
  if not 0.0 < value <= 1.0:
    raise UserError(f"target={value} is outside (0, 1]: it is the fraction of the unpruned "
                    f"cost to KEEP, e.g. 0.45 to remove 55% of the FLOPs")


@functools.lru_cache(maxsize=64)
def _group_tables(structure: ModelStructure, safeguard: float,
                  min_channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """``(group_id [N], group_start [G], keep_min [G], num_candidates U)``, static."""
  sizes = [g.size for g in structure.groups]
  group_id = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
  start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  keep_min = np.array([safeguard_channels(c, safeguard, min_channels) for c in sizes], np.int32)
  return group_id, start, keep_min, int(sum(sizes) - keep_min.sum())


def _flat_importance(structure: ModelStructure, importance: Mapping[str, Array]) -> Array:
  """Importances of every channel in flat order: float32 ``[N]``."""
  names = [g.name for g in structure.groups]
  missing = [n for n in names if n not in importance]
  extra = sorted(set(importance) - set(names))
  if missing or extra:
    raise UserError(f"importance must have one entry per channel group; missing {missing}, "
                    f"unknown {extra}")
  chex.assert_shape([importance[g.name] for g in structure.groups],
                    [(g.size,) for g in structure.groups])
  return jnp.concatenate([jnp.asarray(importance[n], jnp.float32) for n in names])


def _group_position(structure: ModelStructure, flat_importance: Array) -> Array:
  """Each channel's place in its group by descending importance: int32 ``[N]``.

  0 is the group's most important channel; ties put the first channel first.
  """
  group_id, start, _, _ = _group_tables(structure, 0.0, 1)
  n = flat_importance.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  order = jnp.lexsort((idx, -flat_importance, group_id))
  return jnp.zeros((n,), jnp.int32).at[order].set(idx) - start[group_id]


def removal_rank(structure: ModelStructure, flat_importance: Array, safeguard: float = 0.1,
                 min_channels: int = 2) -> Array:
  """Order in which channels are removed: int32 ``[N]`` in flat order.

  Rank ``r < U`` for a candidate (the ``r``-th to go); protected channels get ranks
  ``>= U``, so ``rank >= k`` is the keep mask after ``k`` removals for any ``k <= U``.
  """
  group_id, _, keep_min, _ = _group_tables(structure, safeguard, min_channels)
  n = flat_importance.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  protected = _group_position(structure, flat_importance) < keep_min[group_id]
  # Global removal order: candidates first, ascending importance, ties: last channel first.
  order = jnp.lexsort((-idx, flat_importance, protected))
  return jnp.zeros((n,), jnp.int32).at[order].set(idx)


def _unflatten(structure: ModelStructure, flat: Array) -> dict[str, Array]:
  out, offset = {}, 0
  for g in structure.groups:
    out[g.name] = flat[offset:offset + g.size]
    offset += g.size
  return out


def prune_to_budget(importance: Mapping[str, Array], structure: ModelStructure, target: Any, *,
                    metric: str = "flops", safeguard: float = 0.1, min_channels: int = 2,
                    quant: Any | None = None) -> PruneResult:
  """Masks that keep the most important channels within a cost budget (DESIGN 3).

  Removes the globally least important unprotected channels until
  ``cost(masks) <= target * cost(unpruned)``, removing as few as possible: putting
  back the last one removed would exceed the budget. If the safeguard makes the
  budget unreachable, every group is cut to its ``keep_min`` channels and
  ``reached`` is False (no error inside ``jit``; check it).

  Args:
    importance: ``{group: float32 [C]}`` for every group of ``structure``; higher =
      keep (e.g. PIC's ``a_l * FP + b_l``). Traced.
    structure: the model's static structure (a ``jit`` static argument or closure).
    target: fraction of the unpruned network's cost to KEEP, in ``(0, 1]``: 0.45
      removes 55% of the FLOPs (the reference ResNet-56 setting). A Python float is
      validated; a traced one is not.
    metric: ``"flops"`` (MACs, the paper's FLOPs), ``"params"`` or ``"bops"``.
    safeguard: fraction of each group's channels always kept (reference 0.1).
    min_channels: channels each group always keeps, at least (reference 2).
    quant: bit-widths for ``metric="bops"`` (None: 32 bits); the budget is relative
      to the unpruned network at the same bit-widths, so only pruning counts.

  Returns:
    :class:`PruneResult`: ``masks`` ``{group: float32 [C]}`` of 0/1, the pruned
    network's ``cost``, ``reached`` and ``num_removed``.
  """
  _check_args(target, metric, safeguard, min_channels)
  flat = _flat_importance(structure, importance)
  group_id, _, _, num_candidates = _group_tables(structure, safeguard, min_channels)
  rank = removal_rank(structure, flat, safeguard, min_channels)
  w_bits, a_bits = cost_lib.layer_bits(structure, quant)

  def cost_after(k: Array) -> cost_lib.Cost:  # cost once the k lowest-ranked are removed
    keep = (rank >= k).astype(jnp.float32)
    kept = jax.ops.segment_sum(keep, group_id, num_segments=len(structure.groups),
                               indices_are_sorted=True)
    return cost_lib.total(cost_lib.layer_costs_from_kept(structure, kept, w_bits, a_bits))

  budget = jnp.asarray(target, jnp.float32) * cost_after(jnp.int32(0)).metric(metric)

  def bisect(_, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
    lo, hi = bounds  # the answer lies in [lo, hi]; hi is under budget or hi == U
    mid = (lo + hi) // 2
    ok = cost_after(mid).metric(metric) <= budget
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  bounds = (jnp.int32(0), jnp.int32(num_candidates))
  _, k = lax.fori_loop(0, num_candidates.bit_length() + 1, bisect, bounds)
  final = cost_after(k)
  keep = (rank >= k).astype(jnp.float32)
  return PruneResult(_unflatten(structure, keep), final, final.metric(metric) <= budget, k)


@functools.lru_cache(maxsize=64)
def _uniform_table(structure: ModelStructure, safeguard: float, min_channels: int) -> np.ndarray:
  """Kept channels per group at every kept fraction a group size allows: int ``[F, G]``.

  Row ``i`` is fraction ``f_i`` of the ascending grid of all ``c / C`` (the kept
  counts change only there): group ``g`` keeps ``max(keep_min_g, ceil(f_i * C_g))``.
  """
  sizes = [g.size for g in structure.groups]
  grid = np.array(sorted({c / size for size in sizes for c in range(size + 1)}))
  keep_min = np.array([safeguard_channels(c, safeguard, min_channels) for c in sizes])
  # Rounded before the ceiling: 3 / 16 * 16 is 3, never 4.
  kept = np.ceil(np.round(grid[:, None] * np.array(sizes)[None, :], 9))
  return np.maximum(keep_min[None, :], kept).astype(np.int32)


def prune_uniform(importance: Mapping[str, Array], structure: ModelStructure, target: Any, *,
                  metric: str = "flops", safeguard: float = 0.1, min_channels: int = 2,
                  quant: Any | None = None) -> PruneResult:
  """Masks that keep the same fraction of every group, as large as the budget allows.

  The uniform baseline of the comparison: each group of ``C`` channels keeps its
  ``max(keep_min, ceil(f * C))`` most important channels, with the largest fraction
  ``f`` whose cost is within ``target`` of the unpruned cost. Only fractions ``c / C``
  of some group size change a kept count, so ``f`` is found by bisection over that
  grid (the cost never decreases with ``f``). The importances only choose channels
  inside a group; how many each group keeps does not depend on them. ``keep_min``
  and the other arguments are as in :func:`prune_to_budget`; ``reached`` is False
  when even ``f = 0`` (every group at its safeguard) is over budget.

  Returns:
    :class:`PruneResult` with ``num_removed`` the channels removed in all groups.
  """
  _check_args(target, metric, safeguard, min_channels)
  flat = _flat_importance(structure, importance)
  group_id, _, _, _ = _group_tables(structure, safeguard, min_channels)
  table = jnp.asarray(_uniform_table(structure, safeguard, min_channels), jnp.float32)
  w_bits, a_bits = cost_lib.layer_bits(structure, quant)

  def cost_at(i: Array) -> cost_lib.Cost:
    return cost_lib.total(cost_lib.layer_costs_from_kept(structure, table[i], w_bits, a_bits))

  last = table.shape[0] - 1
  budget = jnp.asarray(target, jnp.float32) * cost_at(last).metric(metric)

  def bisect(_, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
    lo, hi = bounds  # the answer lies in [lo, hi]; lo is under budget or lo == 0
    mid = (lo + hi + 1) // 2
    ok = cost_at(mid).metric(metric) <= budget
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  i, _ = lax.fori_loop(0, last.bit_length() + 1, bisect, (jnp.int32(0), jnp.int32(last)))
  final = cost_at(i)
  keep = (_group_position(structure, flat) < table[i][group_id]).astype(jnp.float32)
  return PruneResult(_unflatten(structure, keep), final, final.metric(metric) <= budget,
                     jnp.int32(flat.shape[0]) - jnp.sum(table[i]).astype(jnp.int32))
