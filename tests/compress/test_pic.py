"""The physics-inspired criterion and its gene operators, on a hand-made structure.

Importances are checked against the formula written out in NumPy, group by group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.compress import pic
from picpq_jax.errors import UserError
from picpq_jax.models import get_model, model_structure
from picpq_jax.models.structure import ChannelGroup, LayerInfo, ModelStructure


def _conv(name, in_group, out_group, c_in, c_out, groups=1):
  return LayerInfo(name, "conv", in_group, out_group, c_in, c_out, (3, 3), (1, 1), groups,
                   False, (8, 8), (8, 8))


def _structure() -> ModelStructure:
  """A residual stream ``s1`` (stem + b0/conv2), a block's ``mid``, and an expansion
  ``hid`` written by a 1x1 conv and filtered by a depthwise conv; a dense head."""
  layers = (
      _conv("stem", None, "s1", 3, 4),
      _conv("b0/conv1", "s1", "mid", 4, 3),
      _conv("b0/conv2", "mid", "s1", 3, 4),
      _conv("e/expand", "s1", "hid", 4, 6),
      _conv("e/dw", "hid", "hid", 6, 6, groups=6),
      LayerInfo("head", "dense", "hid", None, 6, 2, (1, 1), (1, 1), 1, True, (1, 1), (1, 1)),
  )
  groups = (
      ChannelGroup("s1", 4, ("stem", "b0/conv2"), ("b0/conv1", "e/expand"), ()),
      ChannelGroup("mid", 3, ("b0/conv1",), ("b0/conv2",), ()),
      ChannelGroup("hid", 6, ("e/expand", "e/dw"), ("e/dw", "head"), ("e/dw",)),
  )
  return ModelStructure((8, 8, 3), layers, groups)


LAYERS = ("stem", "b0/conv1", "b0/conv2", "e/expand", "e/dw")


def _fp(seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  sizes = {"stem": 4, "b0/conv1": 3, "b0/conv2": 4, "e/expand": 6, "e/dw": 6}
  return {k: rng.uniform(0, 8, size=n).astype(np.float32) for k, n in sizes.items()}


def _numpy_importance(fp, a, b):
  """Hooke's law per layer, summed over each group's writers, written out by hand."""
  i = {name: a[k] * fp[name] + b[k] for k, name in enumerate(LAYERS)}
  return {"s1": i["stem"] + i["b0/conv2"], "mid": i["b0/conv1"],
          "hid": i["e/expand"] + i["e/dw"]}


def test_prunable_layers_in_structure_order():
  assert pic.prunable_layers(_structure()) == LAYERS
  model = get_model("resnet8")
  names = pic.prunable_layers(model_structure(model, (32, 32, 3)))
  want = ["stem_conv"] + [f"stage{s}_block0/conv{c}" for s in (1, 2, 3) for c in (1, 2)]
  assert list(names) == want


def test_importance_sums_coupled_and_depthwise_writers():
  fp = _fp()
  rng = np.random.default_rng(1)
  a, b = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)
  got = pic.pic_importance(fp, jnp.asarray(a), jnp.asarray(b), _structure())
  want = _numpy_importance(fp, a, b)
  assert set(got) == set(want)
  for g in want:
    assert got[g].dtype == jnp.float32 and got[g].shape == want[g].shape
    np.testing.assert_allclose(np.asarray(got[g]), want[g], rtol=1e-6, err_msg=g)


def test_unit_genes_give_the_summed_filter_property():
  fp = _fp(2)
  got = pic.pic_importance(fp, jnp.ones(5), jnp.zeros(5), _structure())
  np.testing.assert_allclose(np.asarray(got["s1"]), fp["stem"] + fp["b0/conv2"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got["mid"]), fp["b0/conv1"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got["hid"]), fp["e/expand"] + fp["e/dw"], rtol=1e-6)


def test_vmap_over_a_population_equals_a_loop_and_compiles_once():
  fp, structure = _fp(3), _structure()
  rng = np.random.default_rng(3)
  a = rng.uniform(0.1, 3, (8, 5)).astype(np.float32)
  b = rng.normal(size=(8, 5)).astype(np.float32)
  traces = []

  @jax.jit
  def population(a, b):
    traces.append(1)
    return jax.vmap(lambda a, b: pic.pic_importance(fp, a, b, structure))(a, b)

  got = population(a, b)
  for p in range(8):
    want = _numpy_importance(fp, a[p], b[p])
    for g in want:
      np.testing.assert_allclose(np.asarray(got[g][p]), want[g], rtol=1e-6)
  population(a + 1, b - 1)
  population(a * 2, b)
  assert len(traces) == 1


def test_fp_std_and_missing_layers():
  fp = _fp(4)
  np.testing.assert_allclose(np.asarray(pic.fp_std(fp, _structure())),
                             [np.std(fp[k]) for k in LAYERS], rtol=1e-5)
  del fp["e/dw"]
  with pytest.raises(UserError, match="'e/dw'"):
    pic.pic_importance(fp, jnp.ones(5), jnp.zeros(5), _structure())


def test_init_genes_shapes_statistics_and_determinism():
  fp, structure = _fp(5), _structure()
  init = jax.jit(jax.vmap(lambda k: pic.init_genes(k, fp, structure)))
  keys = jax.random.split(jax.random.key(7), 4000)
  pop = init(keys)
  assert pop.a.shape == pop.b.shape == (4000, 5) and pop.a.dtype == jnp.float32
  again = init(keys[:1])  # the same key draws the same genes (to an ulp: another program)
  np.testing.assert_allclose(np.asarray(again.a[0]), np.asarray(pop.a[0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(again.b[0]), np.asarray(pop.b[0]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(init(keys).b), np.asarray(pop.b))
  assert not np.allclose(np.asarray(pop.a[0]), np.asarray(pop.a[1]))

  log_a, b = np.log(np.asarray(pop.a)), np.asarray(pop.b)
  std = np.array([np.std(fp[k]) for k in LAYERS])
  assert np.all(np.asarray(pop.a) > 0)
  np.testing.assert_allclose(log_a.mean(0), 0, atol=0.08)  # 4000 draws: s.e. 0.016
  np.testing.assert_allclose(log_a.std(0), 1, atol=0.06)
  np.testing.assert_allclose(b.mean(0) / std, 0, atol=0.08)
  np.testing.assert_allclose(b.std(0) / std, 1, atol=0.06)


@pytest.mark.parametrize("layers,rate,count", [(20, 0.1, 2), (5, 0.1, 1), (7, 1.0, 7)])
def test_mutate_changes_exactly_the_chosen_layers(layers, rate, count):
  assert pic.num_mutated_layers(layers, rate) == count
  rng = np.random.default_rng(layers)
  a = rng.uniform(0.5, 2, layers).astype(np.float32)
  b = rng.normal(size=layers).astype(np.float32)
  std = rng.uniform(0.5, 2, layers).astype(np.float32)
  mutate = jax.jit(pic.mutate, static_argnames="rate")
  seen = np.zeros(layers, bool)
  for seed in range(10):
    child = mutate(jax.random.key(seed), a, b, std, 0.7, rate=rate)
    changed_a = np.asarray(child.a) != a
    changed_b = np.asarray(child.b) != b
    assert changed_a.sum() == count and np.array_equal(changed_a, changed_b)
    assert np.all(np.asarray(child.a) > 0)
    seen |= changed_a
    same = mutate(jax.random.key(seed), a, b, std, 0.7, rate=rate)
    np.testing.assert_array_equal(np.asarray(same.a), np.asarray(child.a))
    np.testing.assert_array_equal(np.asarray(same.b), np.asarray(child.b))
  if count < layers:
    assert seen.sum() > count  # different keys choose different layers


def test_mutation_noise_scales_with_step_and_fp_std():
  layers = 10
  a, b = jnp.full(layers, 2.0), jnp.zeros(layers)
  std = jnp.linspace(0.5, 3.0, layers)
  keys = jax.random.split(jax.random.key(3), 3000)
  children_of = jax.jit(jax.vmap(lambda k, step: pic.mutate(k, a, b, std, step, rate=0.1),
                                 in_axes=(0, None)))
  children = children_of(keys, 0.4)
  log_ratio, shift = np.log(np.asarray(children.a) / 2.0), np.asarray(children.b)
  changed = log_ratio != 0
  assert np.all(changed.sum(1) == 1)
  np.testing.assert_allclose(log_ratio[changed].std(), 0.4, rtol=0.06)
  z = shift[changed] / np.broadcast_to(np.asarray(std), shift.shape)[changed]
  np.testing.assert_allclose(z.std(), 1.0, rtol=0.06)
  still = children_of(keys[:2], 0.0)  # step 0: a is kept, b still moves
  np.testing.assert_array_equal(np.asarray(still.a), np.full((2, layers), 2.0))
  assert np.all(np.sum(np.asarray(still.b) != 0, axis=1) == 1)


def test_mutation_step_schedule():
  counts = [pic.num_mutated_layers(n, 0.1) for n in (3, 9, 10, 19, 30, 55, 70)]
  assert counts == [1, 1, 1, 1, 3, 5, 7]
  assert pic.mutation_step(0, 400) == 1.0
  assert pic.mutation_step(400, 400) == pytest.approx(0.2)
  assert pic.mutation_step(200, 400) == pytest.approx(0.6)
  assert float(pic.mutation_step(jnp.int32(100), 400)) == pytest.approx(0.8)
  with pytest.raises(UserError, match="generations"):
    pic.mutation_step(0, 0)
  with pytest.raises(UserError, match="mutation rate"):
    pic.num_mutated_layers(10, 0.0)
