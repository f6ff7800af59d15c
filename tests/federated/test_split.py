"""The cut is exact: the parts tile the model's variables and compose to its function."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.federated import split as fsplit
from picpq_jax.federated import steps as fsteps
from picpq_jax.train import create_train_state, sgd_nesterov, train_step


@functools.cache
def _setup():
  model = models.get_model("resnet8")
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  # Non-trivial BN statistics and a pruned channel, so both must be routed right.
  variables["batch_stats"]["stage2_block0"]["bn1"]["mean"] += 0.3
  variables["masks"]["stage1"] = variables["masks"]["stage1"].at[3].set(0.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  return model, variables, x


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_parts_tile_the_model_and_compose_to_its_logits(cut):
  model, variables, x = _setup()
  sm = fsplit.split_model(model, cut)
  cv, sv = sm.split(variables)
  merged = sm.merge(cv, sv)
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(variables)):
    assert a is b
  client_params = set(cv["params"])
  assert client_params.isdisjoint(sv["params"])
  assert ("stem_conv" in client_params) and ("head" in sv["params"])
  smashed = sm.client.apply(cv, x)
  assert smashed.shape == {0: (4, 32, 32, 16), 1: (4, 32, 32, 16), 2: (4, 16, 16, 32),
                           3: (4, 8, 8, 64)}[cut]
  np.testing.assert_array_equal(np.asarray(sm.server.apply(sv, smashed)),
                                np.asarray(model.apply(variables, x)))


def test_unsupported_architecture_and_cut_are_user_errors():
  with pytest.raises(UserError, match="resnet20"):
    fsplit.split_model("vgg16", 1)
  with pytest.raises(UserError, match="--cut=4"):
    fsplit.split_model("resnet8", 4)


def test_split_step_equals_a_whole_model_step():
  model, variables, x = _setup()
  labels = jnp.arange(4, dtype=jnp.int32)
  lr = 0.05
  ref = jax.jit(functools.partial(train_step, model=model, tx=sgd_nesterov(lr)))(
      create_train_state(variables, sgd_nesterov(lr)), x, labels)[0]
  sm = fsplit.split_model(model, 1)
  tx = sgd_nesterov(1.0)
  cv, sv = sm.split(variables)
  parts = {"client": fsteps.PartState.create(cv, tx), "server": fsteps.PartState.create(sv, tx)}
  consts = {"client": fsteps.constants(cv), "server": fsteps.constants(sv)}
  step = jax.jit(functools.partial(fsteps.split_step, sm, tx))
  out, metrics = step(parts, consts, x, labels, jnp.float32(lr), jnp.int32(32))
  merged = sm.merge({"params": out["client"].params, "batch_stats": out["client"].batch_stats},
                    {"params": out["server"].params, "batch_stats": out["server"].batch_stats})
  for a, b in zip(jax.tree.leaves((merged["params"], merged["batch_stats"])),
                  jax.tree.leaves((ref.params, ref.batch_stats))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert float(metrics["count"]) == 4.0
  # 4-bit smashed data changes the step, but only a little.
  out4, _ = step(parts, consts, x, labels, jnp.float32(lr), jnp.int32(4))
  d = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out4["client"].params,
                   out["client"].params)
  assert 0 < max(jax.tree.leaves(d)) < 0.05


def test_a_compacted_resnet_splits_exactly():
  """Narrowed groups and index shortcuts (what compaction produces) route through the cut."""
  model = models.CifarResNet(
      depth=8, group_sizes=(("stage1_block0_mid", 8), ("stage2", 24), ("stage2_block0_mid", 5)),
      shortcut_maps=(tuple(range(16)) + (-1,) * 8, tuple(range(24)) + (-1,) * 40))
  variables = models.init_variables(model, jax.random.key(1), (32, 32, 3))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  for cut in (1, 2):
    sm = fsplit.split_model(model, cut)
    cv, sv = sm.split(variables)
    np.testing.assert_array_equal(np.asarray(sm.server.apply(sv, sm.client.apply(cv, x))),
                                  np.asarray(model.apply(variables, x)))
