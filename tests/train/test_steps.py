"""Train and eval steps: one compilation for any masks and bit-widths, exact metric
sums with padding, and BN statistics updated in training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from picpq_jax import models
from picpq_jax.train import create_train_state, eval_step, sgd_nesterov, train_step


def _setup(batch=4):
  model = models.get_model("resnet8")
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  tx = sgd_nesterov(0.05)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
  return model, variables, tx, images, labels


def test_train_step_compiles_once_for_any_masks_and_bits():
  model, variables, tx, images, labels = _setup()
  traces = []

  def counted(state, x, y):
    traces.append(1)  # runs only while tracing
    return train_step(state, x, y, model=model, tx=tx)

  step = jax.jit(counted)
  state = create_train_state(variables, tx)
  state, _ = step(state, images, labels)
  # Prune half of a group and drop one layer to 4 bits: new data, same program.
  masks = dict(state.masks)
  masks["stage1"] = masks["stage1"].at[:8].set(0.0)
  quant = jax.tree.map(lambda b: b, state.quant)
  quant["stage1_block0"]["conv1"]["w_bits"] = jnp.asarray(4, jnp.int32)
  state, _ = step(state.replace(masks=masks, quant=quant), images, labels)
  state, _ = step(state, images, labels)
  assert len(traces) == 1


def test_train_step_updates_batch_stats_and_reduces_loss_on_a_fixed_batch():
  model, variables, tx, images, labels = _setup(batch=8)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx))
  state = create_train_state(variables, tx)
  losses = []
  for _ in range(8):
    state, metrics = step(state, images, labels)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 8
  before = variables["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(state.batch_stats["stem_bn"]["mean"], before)
  assert losses[-1] < 0.5 * losses[0]


def test_eval_step_sums_only_weighted_examples():
  model, variables, _, images, labels = _setup(batch=6)
  weights = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
  out = eval_step(variables, images, labels, weights, model=model)
  logits = np.asarray(model.apply(variables, images, train=False), np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
  ce = -log_probs[np.arange(6), np.asarray(labels)]
  correct = (logits.argmax(1) == np.asarray(labels)).astype(float)
  np.testing.assert_allclose(float(out["loss_sum"]), ce[:4].sum(), rtol=1e-5)
  assert float(out["correct"]) == correct[:4].sum()
  assert float(out["count"]) == 4.0
