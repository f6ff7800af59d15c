"""The ``conv_inputs="materialized"`` switch of the train step: same loss, gradients
and BN statistics as the plain step, with every conv input computed by a dot."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.compress.quantizers import DoReFa
from picpq_jax.models.quantizer import FullPrecision
from picpq_jax.train import create_train_state, steps


def test_materialize_is_the_identity_by_blocks():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 24)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(steps.materialize)(x)), np.asarray(x))
  odd = x[..., :5]  # 5 channels: one 5 x 5 identity
  np.testing.assert_array_equal(np.asarray(steps.materialize(odd)), np.asarray(odd))


@pytest.mark.parametrize("arch,quantizer", [("resnet8", None), ("resnet8", "dorefa")])
def test_materialized_step_matches_the_plain_step(arch, quantizer):
  q = DoReFa() if quantizer else FullPrecision()
  model = models.get_model(arch, quantizer=q)
  variables = models.init_variables(model, jax.random.key(1), (32, 32, 3))
  if quantizer:  # 4-bit weights and activations in one layer
    variables["quant"]["stage2_block0"]["conv2"] = {"w_bits": jnp.int32(4), "a_bits": jnp.int32(4)}
  masks = dict(variables["masks"])
  masks["stage1"] = masks["stage1"].at[:5].set(0.0)
  variables["masks"] = masks
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=6), jnp.int32)
  tx = optax.sgd(1.0)  # new params = params - grads

  out = {}
  for mode in steps.CONV_INPUTS:
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, conv_inputs=mode))
    state = create_train_state(variables, tx)
    new, metrics = step(state, images, labels)
    grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
    out[mode] = (metrics["loss"], grads, new.batch_stats)
    if mode == "materialized":  # every conv but the stem reads a dot's output
      hlo = step.lower(state, images, labels).as_text()
      convs = sum(1 for l in models.model_structure(model, (32, 32, 3)).layers if l.kind == "conv")
      assert hlo.count("stablehlo.dot_general") >= convs - 1

  (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = out["fused"], out["materialized"]
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a)) > 1e-3  # not all zero


def test_unknown_conv_inputs_is_a_user_error():
  model, tx = models.get_model("resnet8"), optax.sgd(0.1)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  state = jax.eval_shape(lambda v: create_train_state(v, tx), variables)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  with pytest.raises(UserError, match="conv_inputs"):  # raised while tracing
    jax.eval_shape(functools.partial(steps.train_step, model=model, tx=tx, conv_inputs="stored"),
                   state, x, y)
