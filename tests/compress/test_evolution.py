"""Regularized evolution: one program per generation (no recompiles), aging and
tournament semantics, map == vmap == a plain loop, and resume == uninterrupted."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import data as pdata
from picpq_jax import models
from picpq_jax.compress import evolution, pic, search
from picpq_jax.compress.prune import prune_to_budget
from picpq_jax.errors import UserError
from picpq_jax.train import create_train_state, eval_step, sgd_nesterov, train_step


_TX = sgd_nesterov(0.01)  # one object, so that jitted programs keyed by it are reused


def _spec(model, structure, strategy="map", **kw):
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  return evolution.FitnessSpec(
      model=model, structure=structure, tx=_TX,
      preprocess_train=lambda k, x: pdata.normalize(pdata.augment(k, x), mean, std),
      preprocess_eval=lambda x: pdata.normalize(x, mean, std),
      target=0.6, strategy=strategy, **kw)


@pytest.fixture(scope="module")
def setup():
  model = models.get_model("resnet8")
  structure = models.model_structure(model, (32, 32, 3))
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  rng = np.random.default_rng(0)
  fp = {name: jnp.asarray(rng.uniform(0, 10, structure.layer(name).out_features), jnp.float32)
        for name in pic.prunable_layers(structure)}
  images = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, size=48).astype(np.int32)
  dataset = pdata.ImageDataset(images, labels, tuple(f"c{i}" for i in range(10)))
  train, val = pdata.train_val_split(dataset, 16, seed=0)
  config = search.SearchConfig(population=4, sample=2, generations=3, children=1, tau_hat=2,
                               search_batch_size=8, search_val_size=16)
  return model, structure, variables, fp, train, val, config


@functools.lru_cache(maxsize=2)
def _plain_programs(model, tx):
  return (jax.jit(functools.partial(train_step, model=model, tx=tx)),
          jax.jit(functools.partial(eval_step, model=model)))


def _plain_loss(spec, variables, fp, data, key, a, b):
  """The fitness by hand: prune, ``T`` jitted masked SGD steps, validation loss."""
  model, structure = spec.model, spec.structure
  masks = prune_to_budget(pic.pic_importance(fp, a, b, structure), structure,
                          spec.target).masks
  state = create_train_state({**variables, "masks": masks}, spec.tx)
  keys = jax.random.split(key, data.train_images.shape[0])
  step, evaluate = _plain_programs(model, spec.tx)
  for t in range(data.train_images.shape[0]):
    x = spec.preprocess_train(keys[t], data.train_images[t])
    state, _ = step(state, x, data.train_labels[t])
  loss_sum = count = 0.0
  for v in range(data.val_images.shape[0]):
    out = evaluate(state.variables, spec.preprocess_eval(data.val_images[v]),
                   data.val_labels[v], data.val_weights[v])
    loss_sum += float(out["loss_sum"]); count += float(out["count"])
  return loss_sum / count, masks


def test_candidate_loss_equals_a_plain_python_loop(setup):
  model, structure, variables, fp, train, val, config = setup
  spec = _spec(model, structure)
  data = search.stage_search_data(train, val, config, seed=0, generation=0)
  key = jax.random.key(3)
  a, b = pic.init_genes(jax.random.key(1), fp, structure)
  got = evolution.candidate_loss(spec, variables, fp, data, key, a, b)
  np.testing.assert_allclose(float(got), _plain_loss(spec, variables, fp, data, key, a, b)[0],
                             rtol=1e-5)


def test_compact_strategy_equals_the_masked_loss_and_compiles_per_padded_width(setup):
  model, structure, variables, fp, train, val, config = setup
  spec = _spec(model, structure, "compact", pad_to=32)
  data = search.stage_search_data(train, val, config, seed=0, generation=0)
  key = jax.random.key(3)
  a, b = evolution.initial_population(jax.random.key(4), fp, structure, 2)
  evolution._compact_programs.cache_clear()
  got = evolution.population_loss(spec, variables, fp, data, key, a, b)
  widths, stage2 = set(), set()
  sizes = {g.name: g.size for g in structure.groups}
  for i in range(2):
    want, masks = _plain_loss(spec, variables, fp, data, key, a[i], b[i])
    np.testing.assert_allclose(float(got[i]), want, rtol=1e-4)
    widths.add(tuple(min(sizes[g], -(-int(m.sum()) // 32) * 32) for g, m in masks.items()))
    stage2.add(tuple(np.flatnonzero(np.asarray(masks["stage2"]))))
  # one program per distinct padded width set: the shortcut maps (which differ with
  # the kept stage-2 channels) are traced arguments
  assert len(widths) == 1 and len(stage2) == 2
  assert evolution._compact_programs.cache_info().misses == 1


def test_map_unroll_and_vmap_strategies_agree(setup):
  model, structure, variables, fp, train, val, config = setup
  data = search.stage_search_data(train, val, config, seed=0, generation=0)
  a, b = evolution.initial_population(jax.random.key(2), fp, structure, 2)
  key = jax.random.key(5)
  by_map = evolution.population_loss(_spec(model, structure, "map"), variables, fp, data, key, a, b)
  by_vmap = evolution.population_loss(_spec(model, structure, "vmap"), variables, fp, data, key, a, b)
  by_unroll = jax.jit(functools.partial(evolution.population_loss,
                                        _spec(model, structure, "unroll")))(
      variables, fp, data, key, a, b)
  np.testing.assert_allclose(np.asarray(by_map), np.asarray(by_vmap), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(by_map), np.asarray(by_unroll), rtol=1e-4)
  assert len(set(np.round(np.asarray(by_map), 6))) == 2  # different genes, different losses


@pytest.mark.parametrize("strategy,tau_hat,devices,backend,expected", [
    ("auto", 2, 1, "cpu", "unroll"), ("auto", 8, 1, "cpu", "unroll"),
    ("auto", 9, 1, "cpu", "compact"), ("auto", 200, 4, "cpu", "map"),
    ("auto", 200, 1, "gpu", "map"), ("auto", 2, 1, "tpu", "map"),
    ("vmap", 200, 1, "cpu", "vmap"), ("map", 2, 1, "cpu", "map")])
def test_auto_strategy_follows_the_measured_rule(strategy, tau_hat, devices, backend, expected):
  # the rule of RESULTS.md: on CPU unroll up to 8 steps, then compact (map on a mesh)
  assert evolution.resolve_strategy(strategy, tau_hat, devices, backend) == expected


def test_auto_is_accepted_and_the_default():
  assert search.SearchConfig().strategy == "auto"
  with pytest.raises(UserError, match="strategy.*auto"):
    search.SearchConfig(strategy="fast")


def test_evolve_replaces_the_oldest_with_a_mutated_tournament_winner():
  fp_std = jnp.ones(3)
  population = evolution.start_population(
      jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + 1, jnp.zeros((4, 3)),
      jnp.asarray([0.5, 0.1, 0.9, 0.7]))._replace(
          born=jnp.asarray([2, 1, 0, 3], jnp.int32), generation=jnp.int32(5))
  seen = {}

  def evaluate(variables, fp, data, key, a, b):
    seen["a"] = a
    return jnp.full((a.shape[0],), 0.05)

  new = evolution.evolve(population, jax.random.key(0), None, None, None, evaluate=evaluate,
                         fp_std=fp_std, sample=4, children=2, generations=10, mutation_rate=0.34,
                         replace=False)
  # The two oldest (born 0 and 1: members 2 and 1) die; children inherit from the fittest.
  np.testing.assert_array_equal(np.asarray(new.born), [2, 6, 6, 3])
  np.testing.assert_allclose(np.asarray(new.loss), [0.5, 0.05, 0.05, 0.7])
  assert int(new.generation) == 6
  parent = np.asarray(population.a[1])  # loss 0.1 wins a tournament over everyone
  for child in np.asarray(seen["a"]):
    changed = child != parent
    assert changed.sum() == 1  # 34% of 3 layers -> one layer mutated
    assert np.all(child > 0)


def test_search_compiles_one_program_and_resumes_to_the_same_result(setup, tmp_path):
  model, structure, variables, fp, train, val, config = setup
  traces = []
  spec = _spec(model, structure)
  counted = evolution.candidate_loss

  def counting(*args, **kw):
    traces.append(1)
    return counted(*args, **kw)

  evolution.candidate_loss = counting
  try:
    full = search.run_search(spec, config, variables, fp, train, val, str(tmp_path / "full"),
                             progress=False)
    after_full = len(traces)
    search.run_search(spec, config, variables, fp, train, val, str(tmp_path / "split"),
                      progress=False, stop_after=1)
    resumed = search.run_search(spec, config, variables, fp, train, val,
                                str(tmp_path / "split"), progress=False)
  finally:
    evolution.candidate_loss = counted
  # One program scores the initial population (a chunk at a time) and every
  # generation's children; the stopped and the resumed search reuse it.
  assert after_full == 1
  assert len(traces) == 1
  assert full.generations == resumed.generations == 3
  assert len(full.best_loss_history) == 4
  assert full.best_loss_history == resumed.best_loss_history
  np.testing.assert_array_equal(full.a, resumed.a)
  # Aging keeps the best-so-far only while it is young: history need not be monotone,
  # but every entry is a real loss.
  assert np.all(np.isfinite(full.best_loss_history))


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from picpq_jax import data as pdata, models
    from picpq_jax.compress import evolution, pic, search
    from picpq_jax.train import sgd_nesterov
    model = models.get_model("resnet8")
    structure = models.model_structure(model, (32, 32, 3))
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    rng = np.random.default_rng(0)
    fp = {n: jnp.asarray(rng.uniform(0, 10, structure.layer(n).out_features), jnp.float32)
          for n in pic.prunable_layers(structure)}
    ds = pdata.ImageDataset(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
                            rng.integers(0, 10, 40).astype(np.int32), tuple("abcdefghij"))
    train, val = pdata.train_val_split(ds, 8, seed=0)
    config = search.SearchConfig(population=4, sample=2, generations=1, tau_hat=1,
                                 search_batch_size=8, search_val_size=8)
    m, s = np.full(3, .5, np.float32), np.full(3, .25, np.float32)
    spec = evolution.FitnessSpec(model, structure, sgd_nesterov(0.01),
        lambda k, x: pdata.normalize(pdata.augment(k, x), m, s),
        lambda x: pdata.normalize(x, m, s), target=0.6)
    data = search.stage_search_data(train, val, config, 0, 0)
    a, b = evolution.initial_population(jax.random.key(2), fp, structure, 4)
    mesh = Mesh(np.array(jax.devices()), ("population",))
    sharded = jax.jit(evolution.sharded_population_loss(spec, mesh))(
        variables, fp, data, jax.random.key(1), a, b)
    plain = evolution.population_loss(spec, variables, fp, data, jax.random.key(1), a, b)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), rtol=1e-5)
    print("OK", len(sharded.sharding.device_set))
""")


def test_population_sharded_over_four_devices_matches_one():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "OK 4"


def test_identity_member_is_in_generation_zero(setup):
  _, structure, _, fp, _, _, _ = setup
  a, b = evolution.initial_population(jax.random.key(0), fp, structure, 5)
  np.testing.assert_array_equal(np.asarray(a[0]), 1.0)
  np.testing.assert_array_equal(np.asarray(b[0]), 0.0)
  assert np.all(np.asarray(a[1:]) != 1.0)  # the others are drawn
  a, _ = evolution.initial_population(jax.random.key(0), fp, structure, 5, identity=False)
  assert np.all(np.asarray(a) != 1.0)


def test_best_ever_search_returns_the_best_genes_seen():
  """A hand-made fitness: the loss of genes a is |a_0 - 3|. The first generation's
  child is the best ever; aging kills it after two more generations, and later
  children (pushed away from 3 by hand) are worse."""
  fitness = lambda a: jnp.abs(a[:, 0] - 3.0)
  a0 = jnp.asarray([[1.0, 1.0], [5.0, 1.0]])
  population = evolution.start_population(a0, jnp.zeros((2, 2)), fitness(a0))
  proposals = [jnp.asarray([[3.1, 1.0]]), jnp.asarray([[6.0, 1.0]]), jnp.asarray([[7.0, 1.0]])]
  seen = []
  for g, child in enumerate(proposals):
    seen.append((float(fitness(child)[0]), np.asarray(child[0])))
    population = evolution.replace_oldest(population, child, jnp.zeros((1, 2)),
                                          fitness(child))
  best_loss, best_a = min(seen + [(2.0, np.asarray(a0[0]))], key=lambda t: t[0])
  a, b, loss = evolution.best(population, ever=True)
  np.testing.assert_allclose(np.asarray(a), best_a)
  np.testing.assert_allclose(float(loss), best_loss, rtol=1e-6)
  assert 3.1 not in np.asarray(population.a)[:, 0]  # aged out of the final population
  a_final, _, loss_final = evolution.best(population, ever=False)
  assert float(loss_final) > float(loss)  # the old behaviour returned a worse member
  np.testing.assert_allclose(np.asarray(a_final), [6.0, 1.0])


def test_mutation_with_replacement_sums_repeated_draws():
  """Three draws over two layers: with replacement some layer is drawn twice, and its
  noise is one N(0, sqrt(2) step); without, at most every layer once."""
  a, b, std = jnp.ones(2), jnp.zeros(2), jnp.ones(2)
  keys = jax.random.split(jax.random.key(0), 4000)
  out = jax.vmap(lambda k: pic.mutate(k, a, b, std, 1.0, rate=1.0, replace=True))(keys)
  # rate 1 -> 2 draws over 2 layers: a layer gets 0, 1 or 2 draws (1/4, 1/2, 1/4).
  var = float(np.var(np.asarray(out.b)[:, 0]))
  np.testing.assert_allclose(var, 0.25 * 0 + 0.5 * 1 + 0.25 * 2, rtol=0.1)
  assert np.mean(np.asarray(out.b)[:, 0] == 0.0) == pytest.approx(0.25, abs=0.03)
