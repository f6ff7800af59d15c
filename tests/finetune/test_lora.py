"""LoRA: adapters against numpy, merge for export, dropout, errors, frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import lora, peft
from tests.finetune.toy import Toy, toy_batch, toy_loss, toy_params

ALPHA, RANK = 6.0, 2


def _random_b(adapters, seed=3):
  """Adapters with B drawn too, so that ``A @ B`` is not zero."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.asarray(rng.normal(size=x.shape), x.dtype)
                       if path[-1].key == "lora_b" else x), adapters)


def test_init_shapes_and_identity_at_start():
  params = toy_params()
  adapters = lora.init(jax.random.key(0), params, "query|value", RANK)
  assert set(adapters["attention"]) == {"query", "value"}
  for name in ("query", "value"):
    a, b = adapters["attention"][name]["lora_a"], adapters["attention"][name]["lora_b"]
    assert a.shape == (8, RANK) and b.shape == (RANK, 8)
    assert np.all(np.abs(a) <= 1 / np.sqrt(8)) and np.any(a != 0) and np.all(b == 0)
  same = lora.apply(params, adapters, ALPHA)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
    np.testing.assert_array_equal(x, y)


def test_apply_is_w_plus_scaled_product_in_numpy():
  params = toy_params()
  adapters = _random_b(lora.init(jax.random.key(0), params, "query|mlp/output", RANK))
  out = lora.apply(params, adapters, ALPHA)
  for module in (("attention", "query"), ("mlp", "output")):
    a = np.asarray(adapters[module[0]][module[1]]["lora_a"], np.float64)
    b = np.asarray(adapters[module[0]][module[1]]["lora_b"], np.float64)
    w = np.asarray(params[module[0]][module[1]]["kernel"], np.float64)
    np.testing.assert_allclose(out[module[0]][module[1]]["kernel"], w + ALPHA / RANK * a @ b,
                               rtol=1e-5, atol=1e-6)
  # untouched layers: the very same values
  np.testing.assert_array_equal(out["attention"]["value"]["kernel"],
                                params["attention"]["value"]["kernel"])
  np.testing.assert_array_equal(out["attention"]["query"]["bias"],
                                params["attention"]["query"]["bias"])


def test_merged_model_equals_adapted_model():
  params, batch = toy_params(), toy_batch()
  adapters = _random_b(lora.init(jax.random.key(1), params, "query|value|intermediate", RANK))
  merged = lora.merge(params, adapters, ALPHA)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
  adapted = Toy().apply({"params": lora.apply(params, adapters, ALPHA)}, batch["x"])
  exported = Toy().apply({"params": merged}, batch["x"])
  base = Toy().apply({"params": params}, batch["x"])
  np.testing.assert_allclose(exported, adapted, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3  # the adapters matter


def test_dropout_drops_rows_of_a_and_rescales_the_rest():
  params = toy_params()
  p, rank = 0.5, 8  # B = I (rank 8 = in = out): the kernel's change shows A' itself
  adapters = lora.init(jax.random.key(0), params, "query", rank)
  adapters["attention"]["query"]["lora_b"] = jnp.eye(rank)
  out = lora.apply(params, adapters, ALPHA, dropout=p, key=jax.random.key(5))
  seen = (np.asarray(out["attention"]["query"]["kernel"])
          - np.asarray(params["attention"]["query"]["kernel"])) / (ALPHA / rank)
  a = np.asarray(adapters["attention"]["query"]["lora_a"])
  dropped = np.all(np.abs(seen) < 1e-6, axis=1)
  assert 0 < dropped.sum() < rank  # with this key, some rows but not all
  np.testing.assert_allclose(seen[~dropped], a[~dropped] / (1 - p), rtol=1e-5, atol=1e-6)
  # no key (evaluation): no dropout
  np.testing.assert_allclose(
      (np.asarray(lora.apply(params, adapters, ALPHA, dropout=p)["attention"]["query"]["kernel"])
       - np.asarray(params["attention"]["query"]["kernel"])) / (ALPHA / rank), a, atol=1e-6)


def test_errors_name_the_layer_or_list_the_paths():
  params = toy_params()
  with pytest.raises(UserError, match=r"larger than layer head \(8x3\).*--rank <= 3"):
    lora.init(jax.random.key(0), params, "head", 4)
  with pytest.raises(UserError, match=r"matches none.*attention/query.*mlp/intermediate"):
    lora.init(jax.random.key(0), params, "qkv_proj", 2)
  with pytest.raises(UserError, match="not a regular expression"):
    lora.init(jax.random.key(0), params, "query(", 2)
  with pytest.raises(UserError, match="at least 1"):
    lora.init(jax.random.key(0), params, "query", 0)


def test_gradients_of_a_and_b_match_the_chain_rule():
  """For L = sum(x @ W'), dL/dW' = x^T 1, so dA = s dW' B^T and dB = s A^T dW'."""
  params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)),
                                            jnp.float32)}}
  adapters = _random_b(lora.init(jax.random.key(2), params, "dense", RANK))
  x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  loss = lambda ad: jnp.sum(x @ lora.apply(params, ad, ALPHA)["dense"]["kernel"])  # noqa: E731
  grads = jax.grad(loss)(adapters)["dense"]
  a = np.asarray(adapters["dense"]["lora_a"], np.float64)
  b = np.asarray(adapters["dense"]["lora_b"], np.float64)
  d_w = x.astype(np.float64).T @ np.ones((5, 3))
  s = ALPHA / RANK
  np.testing.assert_allclose(grads["lora_a"], s * d_w @ b.T, rtol=1e-5)
  np.testing.assert_allclose(grads["lora_b"], s * a.T @ d_w, rtol=1e-5)


def test_training_moves_only_the_adapters():
  params, batch = toy_params(), toy_batch()
  before = jax.tree.map(np.array, params)
  method = peft.train_also(lora.method("query|value", RANK, ALPHA), "head")
  frozen, trainable = method.init(jax.random.key(0), params)
  start = jax.tree.map(np.array, trainable)
  train = peft.make_train_step(toy_loss, optax.adam(1e-2), method)
  state = train.init(trainable)
  # Adam holds two moments of each trainable scalar (and one step count), nothing else
  sizes = [x.size for x in jax.tree.leaves(state)]
  assert sum(sizes) == 2 * peft.trainable_count(trainable) + 1
  assert peft.trainable_count(trainable) == 2 * (8 * RANK + RANK * 8) + 8 * 3 + 3
  losses = []
  for i in range(4):
    trainable, state, loss, _ = train.step(frozen, trainable, state, batch, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  base, kept = peft.flatten(before), peft.flatten(frozen)
  assert set(base) - set(kept) == {"head/kernel", "head/bias"}
  for path, x in kept.items():
    np.testing.assert_array_equal(x, base[path])  # the base did not move
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)  # and the caller's params were not donated
  moved = [np.abs(np.asarray(x) - y).max() for x, y in
           zip(jax.tree.leaves(trainable), jax.tree.leaves(start))]
  assert min(moved) > 0
