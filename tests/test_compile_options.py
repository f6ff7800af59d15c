"""The library's XLA options: they take effect on CPU, keep numerics (a model's
gradients against a float64 reference), and an option this XLA rejects falls back
to the defaults instead of failing every program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from picpq_jax import compile_options, models
from picpq_jax.train.steps import cross_entropy

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _conv_relu_sum(x, w):
  y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jax.nn.relu(y) ** 2)


def _args():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32),
          jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32))


def test_conv_gradient_with_the_options_equals_numpy():
  grad = jax.grad(_conv_relu_sum, argnums=(0, 1))
  ours, default = compile_options.jit(grad), jax.jit(grad)
  args = _args()
  x, w = map(np.asarray, args)  # numpy: y = sum over taps of shifted x @ w[i, j]
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(xp[:, i:i + 8, j:j + 8] @ w[i, j] for i in range(3) for j in range(3))
  dy = 2 * np.maximum(y, 0)
  dw = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + 8, j:j + 8], dy)
                           for j in range(3)]) for i in range(3)])
  for got in (ours(*args)[1], default(*args)[1]):
    np.testing.assert_allclose(np.asarray(got), dw, rtol=1e-4, atol=1e-4)


def test_an_option_this_xla_rejects_falls_back_to_the_defaults(monkeypatch):
  monkeypatch.setattr(compile_options, "CPU_OPTIONS", {"xla_cpu_no_such_option": "1"})
  assert compile_options.compiler_options() is None
  assert float(compile_options.jit(_conv_relu_sum)(*_args())) > 0
  monkeypatch.setattr(compile_options, "CPU_OPTIONS", {})
  assert compile_options.compiler_options() is None


def test_resnet8_gradients_match_float64_with_the_options():
  """Train-mode (batch statistics) gradients of a whole network: the options must not
  cost accuracy (with no YNNPACK fusion at all they were 0.4-2.4% off)."""
  model = models.get_model("resnet8")
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, 32).astype(np.int32)

  def loss(params, x):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.mean(cross_entropy(logits, y))

  grad = jax.grad(loss)
  got = compile_options.jit(grad)(variables["params"], x)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    want = jax.jit(grad)(p64, jnp.asarray(x, jnp.float64))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    assert np.max(np.abs(np.asarray(g, np.float64) - w)) <= 5e-5 * np.max(np.abs(w))
