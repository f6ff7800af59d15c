"""Global pruning to a budget against a straightforward NumPy greedy pruner.

The reference removes the globally least important unprotected channel one at a
time, recomputing the network cost in float64 after each removal, until the cost
is under the target. Protected: the ``max(2, ceil(0.1 * C))`` most important
channels of each group. Ties: higher importance, then lower flat index, outranks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax.compress import prune as prune_lib
from picpq_jax.errors import UserError
from picpq_jax.models import get_model, get_spec, model_structure


@functools.cache
def _structure(name: str):
  return model_structure(get_model(name), get_spec(name).input_shape)


def np_cost(structure, masks, metric: str, bits: dict[str, int] | None = None) -> float:
  """MACs, params (kernel + bias) or BOPs (convs MACs, dense params, times bits^2), float64."""
  total = 0.0
  for l in structure.layers:
    c_in = masks[l.in_group].sum() if l.in_group else l.in_features
    c_out = masks[l.out_group].sum() if l.out_group else l.out_features
    per_out = 1 if l.depthwise else c_in / l.feature_group_count
    weights = l.kernel_size[0] * l.kernel_size[1] * per_out * c_out
    macs = l.out_hw[0] * l.out_hw[1] * weights
    params = weights + (c_out if l.use_bias else 0)
    b = (bits or {}).get(l.name, 32)
    total += {"flops": macs, "params": params,
              "bops": (params if l.kind == "dense" else macs) * b * b}[metric]
  return total


def keep_min(size: int) -> int:
  return max(2, math.ceil(0.1 * size))


def np_greedy(structure, importance, target, metric="flops", bits=None):
  """Masks and the removal order of the greedy reference pruner (float64)."""
  masks = {g.name: np.ones(g.size) for g in structure.groups}
  candidates = []  # (importance, -flat index, group, channel): ascending = removed first
  flat = 0
  for g in structure.groups:
    imp = np.asarray(importance[g.name], np.float64)
    by_rank = sorted(range(g.size), key=lambda c: (-imp[c], c))  # most important first
    for c in by_rank[keep_min(g.size):]:
      candidates.append((imp[c], -(flat + c), g.name, c))
    flat += g.size
  candidates.sort()
  budget = target * np_cost(structure, masks, metric, bits)
  removed = []
  for _, _, group, c in candidates:
    if np_cost(structure, masks, metric, bits) <= budget:
      break
    masks[group][c] = 0.0
    removed.append((group, c))
  return masks, removed, budget


def random_importance(structure, seed):
  rng = np.random.default_rng(seed)
  return {g.name: rng.normal(size=g.size).astype(np.float32) for g in structure.groups}


def _jitted(structure, target, **kwargs):
  return jax.jit(lambda imp: prune_lib.prune_to_budget(imp, structure, target, **kwargs))


@pytest.mark.parametrize("metric", ["flops", "params", "bops"])
def test_matches_numpy_greedy_and_stops_one_channel_under(metric):
  structure = _structure("resnet20")
  bits = {"stage1_block0/conv1": 4, "stage2_block1/conv2": 6, "stage3_block2/conv1": 8}
  quant = None
  if metric == "bops":  # the budget is relative to the unpruned net at these bits
    quant = traverse_util.unflatten_dict(
        {f"{l.name}/{k}": jnp.int32(bits.get(l.name, 32))
         for l in structure.layers for k in ("w_bits", "a_bits")}, sep="/")
  importance = random_importance(structure, seed=1)
  result = _jitted(structure, 0.45, metric=metric, quant=quant)(importance)
  want, removed, budget = np_greedy(structure, importance, 0.45, metric,
                                    bits if metric == "bops" else None)
  for g in structure.groups:
    np.testing.assert_array_equal(np.asarray(result.masks[g.name]), want[g.name], err_msg=g.name)
  assert bool(result.reached) and int(result.num_removed) == len(removed)
  got = np_cost(structure, want, metric, bits)
  assert got <= budget
  np.testing.assert_allclose(float(result.cost.metric(metric)), got, rtol=1e-6)
  group, c = removed[-1]  # one channel fewer removed would be over budget
  want[group][c] = 1.0
  assert np_cost(structure, want, metric, bits) > budget


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_safeguard_is_never_broken(target):
  structure = _structure("resnet20")
  result = _jitted(structure, target)(random_importance(structure, seed=2))
  for g in structure.groups:
    kept = np.asarray(result.masks[g.name])
    assert set(np.unique(kept)) <= {0.0, 1.0}
    assert kept.sum() >= keep_min(g.size), g.name


def test_unreachable_target_returns_max_pruned_and_flags_it():
  structure = _structure("resnet20")
  importance = random_importance(structure, seed=3)
  result = _jitted(structure, 0.01)(importance)
  assert not bool(result.reached)
  total = sum(g.size for g in structure.groups)
  assert int(result.num_removed) == total - sum(keep_min(g.size) for g in structure.groups)
  for g in structure.groups:
    kept = np.asarray(result.masks[g.name])
    assert kept.sum() == keep_min(g.size)
    top = np.argsort(-importance[g.name], kind="stable")[:keep_min(g.size)]
    assert kept[top].all(), g.name  # the protected ones are the most important
  full = {g.name: np.ones(g.size) for g in structure.groups}
  assert float(result.cost.macs) > 0.01 * np_cost(structure, full, "flops")


def test_target_one_removes_nothing():
  structure = _structure("resnet8")
  result = _jitted(structure, 1.0)(random_importance(structure, seed=4))
  assert int(result.num_removed) == 0 and bool(result.reached)
  assert all(np.asarray(m).all() for m in result.masks.values())


def test_ties_keep_the_first_channels():
  structure = _structure("resnet8")
  importance = {g.name: np.zeros(g.size, np.float32) for g in structure.groups}
  result = _jitted(structure, 0.5)(importance)
  want, _, _ = np_greedy(structure, importance, 0.5)
  for g in structure.groups:
    kept = np.asarray(result.masks[g.name])
    np.testing.assert_array_equal(kept, want[g.name])
    n = int(kept.sum())
    assert kept[:n].all() and not kept[n:].any(), g.name  # a prefix


def test_vmap_matches_separate_calls_without_recompiling():
  structure = _structure("resnet20")
  traces = []

  def prune(imp):
    traces.append(1)
    return prune_lib.prune_to_budget(imp, structure, 0.45)

  sets = [random_importance(structure, seed=10 + i) for i in range(4)]
  single = jax.jit(prune)
  separate = [single(s) for s in sets]
  assert len(traces) == 1  # one trace serves every importance set
  batched = jax.jit(jax.vmap(prune))({k: np.stack([s[k] for s in sets]) for k in sets[0]})
  for i, one in enumerate(separate):
    for name, mask in one.masks.items():
      np.testing.assert_array_equal(np.asarray(batched.masks[name][i]), np.asarray(mask))
    assert int(batched.num_removed[i]) == int(one.num_removed)


def test_bad_input_raises_user_error():
  structure = _structure("resnet8")
  importance = random_importance(structure, seed=5)
  for bad in (0.0, -0.2, 1.5):
    with pytest.raises(UserError, match="fraction of the unpruned"):
      prune_lib.prune_to_budget(importance, structure, bad)
  with pytest.raises(UserError, match="unknown cost metric"):
    prune_lib.prune_to_budget(importance, structure, 0.5, metric="latency")
  with pytest.raises(UserError, match="safeguard"):
    prune_lib.prune_to_budget(importance, structure, 0.5, safeguard=1.5)
  with pytest.raises(UserError, match="min_channels"):
    prune_lib.prune_to_budget(importance, structure, 0.5, min_channels=0)
  with pytest.raises(UserError, match="missing"):
    prune_lib.prune_to_budget({"stage1": importance["stage1"]}, structure, 0.5)


def test_safeguard_channels_rounds_before_ceiling():
  assert prune_lib.safeguard_channels(30, 0.1, 2) == 3  # 0.1 * 30 == 3.0000000000000004
  assert prune_lib.safeguard_channels(16, 0.1, 2) == 2
  assert prune_lib.safeguard_channels(64, 0.1, 2) == 7
  assert prune_lib.safeguard_channels(1, 0.1, 2) == 1  # never more than the group has


def np_uniform(structure, importance, target, metric="flops"):
  """The uniform baseline by scanning every kept fraction a group size allows (float64).

  A group of C channels keeps max(keep_min, ceil(f * C)) channels; the answer is the
  largest f on the grid of all c / C whose cost is under the budget (the kept counts
  only change at those points), each group keeping its most important channels.
  """
  full = {g.name: np.ones(g.size) for g in structure.groups}
  budget = target * np_cost(structure, full, metric)
  grid = sorted({c / g.size for g in structure.groups for c in range(g.size + 1)})
  best = None
  for f in grid:
    masks = {}
    for g in structure.groups:
      kept = max(keep_min(g.size), min(g.size, math.ceil(round(f * g.size, 9))))
      imp = np.asarray(importance[g.name], np.float64)
      order = sorted(range(g.size), key=lambda c: (-imp[c], c))
      masks[g.name] = np.zeros(g.size)
      masks[g.name][order[:kept]] = 1.0
    if np_cost(structure, masks, metric) <= budget:
      best = masks
  return best


@pytest.mark.parametrize("name,target", [("resnet20", 0.45), ("resnet20", 0.7),
                                         ("mobilenetv2", 0.5)])
def test_uniform_matches_numpy_scan(name, target):
  structure = _structure(name)
  importance = random_importance(structure, 3)
  result = jax.jit(lambda imp: prune_lib.prune_uniform(imp, structure, target))(importance)
  expected = np_uniform(structure, importance, target)
  assert bool(result.reached)
  for g in structure.groups:
    np.testing.assert_array_equal(np.asarray(result.masks[g.name]), expected[g.name], g.name)
  fractions = {g.name: expected[g.name].sum() / g.size for g in structure.groups
               if expected[g.name].sum() > keep_min(g.size)}
  # Every group above its safeguard keeps the same fraction, up to one channel.
  sizes = {g.name: g.size for g in structure.groups}
  assert max(fractions.values()) - min(fractions.values()) <= max(
      1 / sizes[n] for n in fractions) + 1e-9
  removed = sum(g.size - expected[g.name].sum() for g in structure.groups)
  assert int(result.num_removed) == removed
