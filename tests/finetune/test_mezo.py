"""MeZO: one step against a numpy transcription, n-SPSA, descent, MeZO + LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import lora, memory, mezo, peft
from tests.finetune.toy import toy_batch, toy_loss, toy_params

EPS, LR = 1e-2, 0.05


def _regression():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=(2,)).astype(np.float32)}
  batch = {"x": rng.normal(size=(6, 3)).astype(np.float32),
           "y": rng.normal(size=(6, 2)).astype(np.float32)}
  return params, batch


def _mse(params, batch, key=None):
  del key
  return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def _mse_np(params, batch):
  r = batch["x"].astype(np.float64) @ params["w"] + params["b"] - batch["y"]
  return np.mean(r ** 2)


@pytest.mark.parametrize("n", [1, 3])
def test_step_equals_numpy_transcription(n):
  params, batch = _regression()
  key = jax.random.key(7)
  # the documented draws: zkey = split(key)[0], k_j = fold_in(zkey, j); a leaf i of at
  # most CHUNK elements is one block: normal(fold_in(fold_in(k_j, i), 0), shape)
  zkey = jax.random.split(key)[0]
  names = sorted(params)  # jax.tree.leaves order of a dict: sorted keys ("b", "w")
  zs = [{name: np.asarray(jax.random.normal(jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(zkey, j), i), 0), params[name].shape), np.float64)
         for i, name in enumerate(names)} for j in range(n)]
  theta = {k: v.astype(np.float64) for k, v in params.items()}
  grads = []
  for z in zs:
    plus = _mse_np({k: theta[k] + EPS * z[k] for k in names}, batch)
    minus = _mse_np({k: theta[k] - EPS * z[k] for k in names}, batch)
    grads.append((plus - minus) / (2 * EPS))
  expect = {k: theta[k] - LR / n * sum(g * z[k] for g, z in zip(grads, zs)) for k in names}

  step = mezo.make_step(_mse, eps=EPS, n=n)
  out, info = step.step({}, jax.tree.map(jnp.asarray, params), batch, key, LR)
  np.testing.assert_allclose(info["projected_grad"], grads, rtol=2e-3, atol=1e-4)
  for k in names:
    np.testing.assert_allclose(out[k], expect[k], rtol=1e-4, atol=1e-5)
  assert abs(float(info["loss"]) - _mse_np(params, batch)) < 1e-2


def test_direction_is_drawn_in_blocks_of_rows():
  key = jax.random.key(3)
  like = {"a": jnp.zeros((11, 3)), "b": jnp.zeros((2,))}
  z = mezo.direction(key, like, chunk=6)  # "a": blocks of 2 rows, the last one of 1
  leaf = jax.random.fold_in(key, 0)
  blocks = [jax.random.normal(jax.random.fold_in(leaf, c), (2 if c < 5 else 1, 3))
            for c in range(6)]
  np.testing.assert_array_equal(z["a"], np.concatenate(blocks))
  np.testing.assert_array_equal(  # a small leaf is one block
      z["b"], jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), 0), (2,)))
  moved = mezo.perturb({"a": jnp.ones((11, 3)), "b": jnp.ones((2,))}, key, 0.5, chunk=6)
  np.testing.assert_allclose(moved["a"], 1 + 0.5 * np.asarray(z["a"]), rtol=1e-6)


def test_step_updates_the_parameters_in_place():
  """memory_analysis of a step for a 4 MiB leaf: a few chunks of temporaries, no copy."""
  params = {"w": jax.ShapeDtypeStruct((4096, 256), jnp.float32)}
  batch = jax.ShapeDtypeStruct((8,), jnp.int32)
  loss = lambda p, b, key: jnp.mean(p["w"][b])  # noqa: E731
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  lr = jax.ShapeDtypeStruct((), jnp.float32)
  step = mezo.make_step(loss, eps=1e-3, n=2, chunk=1 << 14)  # blocks of 64 rows, 64 KiB
  stats = memory.compiled_memory(step.step, {}, params, batch, key, lr)
  assert stats["alias_bytes"] == 4096 * 256 * 4  # the output is the donated input
  assert stats["temp_bytes"] < 4096 * 256 * 4 / 4  # far less than a copy of the leaf


def test_descends_on_a_quadratic():
  params, batch = _regression()
  step = mezo.make_step(_mse, eps=1e-3, n=2)
  theta = jax.tree.map(jnp.asarray, params)
  start = _mse_np(params, batch)
  for t in range(150):
    theta, _ = step.step({}, theta, batch, jax.random.fold_in(jax.random.key(0), t), 0.02)
  end = _mse_np({k: np.asarray(v) for k, v in theta.items()}, batch)
  best = _mse_np(_least_squares(batch), batch)
  assert end - best < 0.25 * (start - best), (start, end, best)


def _least_squares(batch):
  x = np.concatenate([batch["x"], np.ones((len(batch["x"]), 1), np.float32)], 1)
  sol = np.linalg.lstsq(x.astype(np.float64), batch["y"].astype(np.float64), rcond=None)[0]
  return {"w": sol[:3], "b": sol[3]}


def test_mezo_lora_moves_only_adapters_and_estimates_the_directional_derivative():
  params, batch = toy_params(), toy_batch()
  method = lora.method("query|value", 2, 4.0)
  frozen, adapters = method.init(jax.random.key(0), params)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0: a generic point
  key = jax.random.key(11)
  zkey, lkey = jax.random.split(key)
  # independent: the exact gradient along z, by autodiff, vs the SPSA scalar
  z = mezo.direction(jax.random.fold_in(zkey, 0), adapters)
  loss = peft.loss_of(toy_loss, method)
  grad = jax.jit(jax.grad(loss))(adapters, frozen, batch, lkey)
  along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(z)))
  before = jax.tree.map(np.array, frozen)
  step = mezo.make_step(toy_loss, method, eps=1e-3)
  out, info = step.step(frozen, jax.tree.map(jnp.copy, adapters), batch, key, 1e-3)
  np.testing.assert_allclose(float(info["projected_grad"][0]), along, rtol=2e-2, atol=2e-3)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(x, y)
  for a, b, d in zip(jax.tree.leaves(out), jax.tree.leaves(adapters), jax.tree.leaves(z)):
    np.testing.assert_allclose(a, b - 1e-3 * info["projected_grad"][0] * d, rtol=1e-4,
                               atol=1e-6)


def test_donates_the_trainable_buffers_and_rejects_bad_settings():
  params, batch = _regression()
  theta = jax.tree.map(jnp.asarray, params)
  mezo.make_step(_mse, eps=EPS).step({}, theta, batch, jax.random.key(0), LR)
  assert all(x.is_deleted() for x in jax.tree.leaves(theta))  # updated in place
  with pytest.raises(UserError, match="at least one"):
    mezo.make_step(_mse, n=0)
  with pytest.raises(UserError, match="positive"):
    mezo.make_step(_mse, eps=0.0)
