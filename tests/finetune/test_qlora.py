"""Quantized frozen base: codes and scales against numpy, packing, bytes, QLoRA training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picpq_jax.errors import UserError
from picpq_jax.federated.comm import tree_bytes
from picpq_jax.finetune import lora, peft, qlora
from tests.finetune.toy import Toy, toy_batch, toy_loss, toy_params


def _absmax_np(w, bits, block):
  """Block-wise absmax quantization in numpy: (codes int [rows', cols], scale, dequantized)."""
  rows, cols = w.shape
  block = rows if block is None else block
  padded = -(-rows // block) * block
  x = np.zeros((padded, cols), np.float64)
  x[:rows] = w
  q = 2 ** (bits - 1) - 1
  m = np.abs(x.reshape(-1, block, cols)).max(axis=1)
  scale = np.where(m > 0, m / q, 1.0)
  codes = np.clip(np.round(x.reshape(-1, block, cols) / scale[:, None]), -q, q)
  deq = (codes * scale[:, None]).reshape(padded, cols)[:rows]
  return codes.reshape(padded, cols).astype(np.int64), scale, deq


@pytest.mark.parametrize("bits,block", [(8, None), (8, 4), (4, 4), (4, None)])
def test_dequantized_matches_numpy_within_half_a_step(bits, block):
  w = np.random.default_rng(bits).normal(size=(10, 6)).astype(np.float32)
  w[:, 2] = 0.0  # an all-zero column: scale 1, codes 0
  codes, scale, deq = _absmax_np(w, bits, block)
  q = qlora.quantize(jnp.asarray(w), bits, block)
  np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
  got = np.asarray(qlora.dequantize(q))
  assert got.shape == w.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, deq, rtol=1e-6, atol=1e-7)
  step = np.repeat(scale, 10 if block is None else block, axis=0)[:10]
  assert np.all(np.abs(got - w) <= step / 2 + 1e-6)
  assert np.all(got[:, 2] == 0)
  if bits == 8:
    assert q.codes.dtype == np.int8
    np.testing.assert_array_equal(q.codes, codes)
  else:  # two codes per byte: even rows low nibble, odd rows high nibble, offset by 8
    assert q.codes.dtype == np.uint8 and q.codes.shape == (codes.shape[0] // 2, 6)
    packed = np.asarray(q.codes).astype(np.int64)
    np.testing.assert_array_equal(packed & 0xF, codes[0::2] + 8)
    np.testing.assert_array_equal(packed >> 4, codes[1::2] + 8)


def test_bytes_are_four_and_eight_times_smaller_with_the_scales_counted():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(384, 1536)), jnp.float32)
  fp32 = 384 * 1536 * 4
  scales = (384 // 64) * 1536 * 4
  q8, q4 = qlora.quantize(w, 8, 64), qlora.quantize(w, 4, 64)
  assert tree_bytes(q8) == 384 * 1536 + scales
  assert tree_bytes(q4) == 384 * 1536 // 2 + scales
  assert round(fp32 / tree_bytes(q8), 2) == 3.76 and round(fp32 / tree_bytes(q4), 2) == 7.11
  per_channel = qlora.quantize(w, 4, None)  # one scale per output column
  assert tree_bytes(per_channel) == 384 * 1536 // 2 + 1536 * 4
  assert round(fp32 / tree_bytes(per_channel), 2) == 7.84  # 4 / (1/2 + 4/384)


def test_quantize_params_takes_the_dense_kernels_only():
  params = toy_params()
  qparams = qlora.quantize_params(params, bits=4, block_size=4)
  flat = peft.flatten(qparams)
  quantized = {p for p, v in flat.items() if qlora.is_quantized(v)}
  assert quantized == {p for p in flat if p.endswith("/kernel")}
  assert not qlora.is_quantized(flat["word_embeddings/embedding"])
  with pytest.raises(UserError, match="matches none.*word_embeddings/embedding"):
    qlora.quantize_params(params, pattern="conv")
  with pytest.raises(UserError, match="use 4 or 8"):
    qlora.quantize(params["head"]["kernel"], 3)
  with pytest.raises(UserError, match="use 4 or 8"):
    qlora.method(bits=2)


def test_qlora_starts_at_the_quantized_model_and_trains_only_adapters_and_head():
  params, batch = toy_params(), toy_batch()
  method = peft.train_also(qlora.method("query|value", 2, 4.0, bits=4, block_size=4), "head")
  frozen, trainable = method.init(jax.random.key(0), params)
  # the frozen base really is smaller: 4-bit kernels + float32 scales + float rest
  fp = peft.flatten(params)
  base = {p: v for p, v in fp.items() if not p.startswith("head/")}  # the head trains
  expect = sum(v.size // 2 + (v.shape[0] // 4) * v.shape[1] * 4 if p.endswith("kernel")
               else v.size * 4 for p, v in base.items())
  assert tree_bytes(frozen) == expect
  assert expect < tree_bytes(base)  # (blocks of 4 rows: on this toy the scales weigh much)
  # at init (B = 0) the model is the numpy-dequantized one
  deq = dict(fp)
  for p, v in fp.items():
    if p.endswith("kernel") and not p.startswith("head/"):
      deq[p] = _absmax_np(np.asarray(v), 4, 4)[2].astype(np.float32)
  combined, _ = method.combine(frozen, trainable, None)
  forward = jax.jit(Toy().apply)
  logits = forward({"params": combined}, batch["x"])
  np.testing.assert_allclose(logits, forward({"params": peft.unflatten(deq)}, batch["x"]),
                             rtol=1e-5, atol=1e-6)
  codes = [np.array(x) for x in jax.tree.leaves(frozen)]
  results = []
  for remat in (False, qlora.RECOMPUTE_DEQUANTIZED):
    train = peft.make_train_step(toy_loss, optax.adam(1e-2), method, remat=remat)
    theta = jax.tree.map(jnp.copy, trainable)
    state = train.init(theta)
    for i in range(3):
      theta, state, loss, _ = train.step(frozen, theta, state, batch, jax.random.key(i))
    results.append(theta)
  for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  moved = [np.abs(np.asarray(x) - np.asarray(y)).max()
           for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(trainable))]
  assert min(moved) > 0
  for x, y in zip(codes, jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(x, y)
  # adapters export onto the dequantized base like plain LoRA
  merged = lora.merge(qlora.dequantize_params(frozen), results[0]["method"], 4.0)
  assert not any(qlora.is_quantized(v) for v in peft.flatten(merged).values())
