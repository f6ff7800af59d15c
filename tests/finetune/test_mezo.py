"""MeZO: one step against a numpy transcription, n-SPSA, descent, MeZO + LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import lora, mezo, peft
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


def _rbg(key):
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


@pytest.mark.parametrize("n,impl", [(1, None), (3, "rbg")])
def test_step_equals_numpy_transcription(n, impl):
  params, batch = _regression()
  key = jax.random.key(7)
  # the documented draws: zkey = split(key)[0], k_j = fold_in(zkey, j), leaf i of z_j is
  # normal(fold_in(base(k_j), i)), base = k_j itself or an rbg key of 128 bits of it
  zkey = jax.random.split(key)[0]
  base = (lambda k: k) if impl is None else _rbg
  names = sorted(params)  # jax.tree.leaves order of a dict: sorted keys ("b", "w")
  zs = [{name: np.asarray(jax.random.normal(
      jax.random.fold_in(base(jax.random.fold_in(zkey, j)), i), params[name].shape), np.float64)
         for i, name in enumerate(names)} for j in range(n)]
  theta = {k: v.astype(np.float64) for k, v in params.items()}
  grads = []
  for z in zs:
    plus = _mse_np({k: theta[k] + EPS * z[k] for k in names}, batch)
    minus = _mse_np({k: theta[k] - EPS * z[k] for k in names}, batch)
    grads.append((plus - minus) / (2 * EPS))
  expect = {k: theta[k] - LR / n * sum(g * z[k] for g, z in zip(grads, zs)) for k in names}

  step = mezo.make_step(_mse, eps=EPS, n=n, prng_impl=impl)
  out, info = step.step({}, jax.tree.map(jnp.asarray, params), batch, key, LR)
  np.testing.assert_allclose(info["projected_grad"], grads, rtol=2e-3, atol=1e-4)
  for k in names:
    np.testing.assert_allclose(out[k], expect[k], rtol=1e-4, atol=1e-5)
  assert abs(float(info["loss"]) - _mse_np(params, batch)) < 1e-2


def test_direction_is_the_documented_draw():
  params, _ = _regression()
  key = jax.random.key(3)
  z = mezo.direction(key, params)
  np.testing.assert_array_equal(z["w"], jax.random.normal(jax.random.fold_in(_rbg(key), 1),
                                                          (3, 2)))
  plain = mezo.direction(key, params, impl=None)
  np.testing.assert_array_equal(plain["b"], jax.random.normal(jax.random.fold_in(key, 0), (2,)))
  moved = mezo.perturb(jax.tree.map(jnp.asarray, params), key, 0.5)
  np.testing.assert_allclose(moved["b"], params["b"] + 0.5 * np.asarray(z["b"]), rtol=1e-6)


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
  with pytest.raises(UserError, match="unknown"):
    mezo.make_step(_mse, prng_impl="philox")
