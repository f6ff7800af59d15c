"""The small causal GPT: numpy forward pass, causality, loss, training, generation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import GPT, GPTConfig, generate, gpt_loss, init_gpt
from tests.finetune.conftest import np_attention, np_gelu, np_layer_norm

CONFIG = GPTConfig(vocab_size=11, num_layers=2, num_heads=2, width=8, context=6)


@pytest.fixture(scope="module")
def model_params():
  """The GPT and parameters: init_gpt's tree, values drawn by numpy (no compile)."""
  model = GPT(CONFIG)
  shapes = jax.eval_shape(lambda key: init_gpt(key, model), jax.random.key(0))
  rng = np.random.default_rng(0)
  draw = lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "scale" else
                          (0.3 * rng.standard_normal(s.shape)).astype(np.float32))
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def logits_fn(model_params):
  model, _ = model_params
  return jax.jit(lambda p, ids: model.apply({"params": p}, ids))


def np_gpt(p, ids, heads, head=None):
  """Pre-LN GPT in float64 numpy from our parameter tree (kernels [in, out]).

  The output layer is the token embedding (tied) unless ``head`` is given.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  length = ids.shape[1]
  x = p["token_embedding"]["embedding"][ids] + p["position_embedding"]["embedding"][:length]
  allowed = np.tril(np.ones((length, length), bool))[None, None]
  ln = lambda y, q: np_layer_norm(y, q["scale"], q["bias"], 1e-6)
  for i in range(sum(k.startswith("block_") for k in p)):
    b = p[f"block_{i}"]
    a = b["attention"]
    wb = lambda n: (a[n]["kernel"].T, a[n]["bias"])
    x = x + np_attention(ln(x, b["attention_norm"]), *wb("query"), *wb("key"), *wb("value"),
                         *wb("output"), heads, allowed)
    m = b["mlp"]
    h = np_gelu(ln(x, b["mlp_norm"]) @ m["intermediate"]["kernel"] + m["intermediate"]["bias"])
    x = x + h @ m["output"]["kernel"] + m["output"]["bias"]
  x = ln(x, p["final_norm"])
  if head is not None:
    return x @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
  return x @ p["token_embedding"]["embedding"].T


def np_cross_entropy(logits, targets):
  """Mean of -log softmax(logits)[target], float64 numpy, max-shifted."""
  z = logits - logits.max(-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, targets[..., None], -1).mean()


def test_logits_equal_a_numpy_forward_pass_and_the_head_is_tied(model_params, logits_fn):
  model, params = model_params
  assert "head" not in params
  ids = np.array([[1, 5, 2, 9, 0, 3], [4, 4, 4, 10, 7, 1]], np.int32)
  logits = logits_fn(params, ids)
  assert logits.shape == (2, 6, 11) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np_gpt(params, ids, heads=2), atol=1e-5)


def test_output_at_t_ignores_tokens_after_t(model_params, logits_fn):
  _, params = model_params
  ids = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9]], np.int32)
  a, b = np.asarray(logits_fn(params, ids))
  np.testing.assert_allclose(a[:3], b[:3], atol=1e-6)
  assert not np.allclose(a[3:], b[3:], atol=1e-4)


def test_loss_equals_numpy_cross_entropy(model_params, logits_fn):
  model, params = model_params
  x = np.array([[1, 2, 3, 4, 5, 6], [6, 7, 8, 9, 10, 0]], np.int32)
  y = np.array([[2, 3, 4, 5, 6, 7], [7, 8, 9, 10, 0, 1]], np.int32)
  want = np_cross_entropy(np.asarray(logits_fn(params, x), np.float64), y)
  loss = jax.jit(lambda p: gpt_loss(model, p, x, y))(params)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_untied_head_and_remat_keep_the_loss_and_gradients(model_params):
  _, tied = model_params
  config = dataclasses.replace(CONFIG, tie_embeddings=False)
  shapes = jax.eval_shape(lambda key: init_gpt(key, GPT(config)), jax.random.key(0))
  assert shapes["head"]["kernel"].shape == (8, 11)
  head = {"kernel": jax.random.normal(jax.random.key(1), (8, 11)), "bias": jnp.zeros(11)}
  params = {**tied, "head": head}
  x = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  grads = [jax.jit(jax.value_and_grad(lambda p, m=GPT(config, remat=r): gpt_loss(m, p, x, x)))(
      params) for r in (False, True)]
  want = np_cross_entropy(np_gpt(tied, np.asarray(x), 2, head), np.asarray(x))
  np.testing.assert_allclose(grads[0][0], want, rtol=1e-5)
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads[0][1], grads[1][1])


def test_a_few_sgd_steps_reduce_the_loss(model_params):
  model, params = model_params
  corpus = np.tile(np.arange(11, dtype=np.int32), 4)  # 0 1 2 ... 10 0 1 ...
  x = np.stack([corpus[s:s + 6] for s in range(0, 30, 3)])
  y = np.stack([corpus[s + 1:s + 7] for s in range(0, 30, 3)])

  @jax.jit
  def step(p):
    value, g = jax.value_and_grad(lambda q: gpt_loss(model, q, x, y))(p)
    return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), value

  losses = []
  for _ in range(30):
    params, value = step(params)
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0], losses


def test_dropout_needs_its_key_and_changes_the_loss(model_params):
  _, params = model_params
  model = GPT(dataclasses.replace(CONFIG, dropout=0.3))
  x = jnp.array([[1, 2, 3, 4]])
  f = jax.jit(lambda key: gpt_loss(model, params, x, x, dropout_key=key))
  assert f(jax.random.key(0)) == f(jax.random.key(0))
  assert f(jax.random.key(0)) != f(jax.random.key(1))
  no_dropout = np_cross_entropy(np_gpt(params, np.asarray(x), 2), np.asarray(x))
  assert not np.isclose(f(jax.random.key(0)), no_dropout)


def test_greedy_generation_equals_a_python_loop(model_params):
  model, params = model_params
  prompt = np.array([[3, 1, 4], [1, 5, 9]], np.int32)
  seq = prompt
  for _ in range(7):  # The first 3 steps fit the context of 6, the next 4 crop to it.
    window = seq[:, -CONFIG.context:]
    nxt = np.argmax(np_gpt(params, window, heads=2)[:, -1], -1).astype(np.int32)
    seq = np.concatenate([seq, nxt[:, None]], 1)
  out = generate(model, params, jax.random.key(0), prompt, 7, temperature=0.0)
  np.testing.assert_array_equal(out, seq)


def test_sampling_is_seeded_and_keeps_the_prompt(model_params):
  model, params = model_params
  prompt = np.array([[3, 1], [1, 5]], np.int32)
  a = generate(model, params, jax.random.key(3), prompt, 5, temperature=1.0)
  b = generate(model, params, jax.random.key(3), prompt, 5, temperature=1.0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, :2], prompt)
  assert a.shape == (2, 7) and a.dtype == jnp.int32 and 0 <= int(a.min()) <= int(a.max()) < 11


def test_bad_configs_and_inputs_are_user_errors(model_params):
  model, params = model_params
  with pytest.raises(UserError, match="multiple of"):
    GPTConfig(vocab_size=5, width=10, num_heads=4)
  with pytest.raises(UserError, match="dropout"):
    GPTConfig(vocab_size=5, dropout=1.0)
  with pytest.raises(UserError, match="exceed the context"):
    jax.eval_shape(model.apply, {"params": params}, jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(UserError, match="temperature"):
    generate(model, params, jax.random.key(0), np.zeros((1, 2), np.int32), 2, -1.0)
