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


# QLoRA's NF4 levels as published (Dettmers et al. 2023, App. E; bitsandbytes' table).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_levels_are_the_published_sixteen():
  assert qlora.NF4.shape == (16,)
  np.testing.assert_allclose(qlora.NF4, PUBLISHED_NF4, rtol=0, atol=1e-6)
  assert qlora.NF4[7] == 0.0 and np.all(np.diff(qlora.NF4) > 0)


def test_nf4_blockwise_codes_on_a_hand_made_kernel():
  # one block of 4 rows per column; column 0 absmax 1.0, column 1 absmax 4.0
  w = np.array([[0.5, 0.0], [-1.0, 4.0], [0.25, -1.0], [0.1, 0.3]], np.float32)
  # nearest levels by hand: 0.5 -> 0.4407 (12), -1 -> -1 (0), 0.25 -> 0.2461 (10),
  # 0.1 -> 0.0796 (8); 0 -> 0 (7), 1 -> 1 (15), -0.25 -> -0.2844 (4), 0.075 -> 0.0796 (8)
  hand = np.array([[12, 7], [0, 15], [10, 4], [8, 8]])
  nearest = np.abs((w / [1.0, 4.0])[..., None] - np.asarray(PUBLISHED_NF4)).argmin(-1)
  np.testing.assert_array_equal(nearest, hand)  # numpy agrees with the hand
  q = qlora.quantize(jnp.asarray(w), 4, 4, grid="nf4")
  np.testing.assert_allclose(q.scale, [[1.0, 4.0]])
  packed = np.asarray(q.codes).astype(np.int64)  # rows 2i low nibble, 2i + 1 high
  assert q.codes.dtype == np.uint8 and packed.shape == (2, 2)
  np.testing.assert_array_equal(packed & 0xF, hand[0::2])
  np.testing.assert_array_equal(packed >> 4, hand[1::2])
  expect = np.asarray(PUBLISHED_NF4)[hand] * [1.0, 4.0]
  np.testing.assert_allclose(qlora.dequantize(q), expect, rtol=1e-6, atol=1e-7)
  with pytest.raises(UserError, match="nf4 grid has 4 bits"):
    qlora.quantize(jnp.asarray(w), 8, 4, grid="nf4")


def test_nf4_beats_the_uniform_grid_on_normal_weights():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(256, 64)), jnp.float32)
  err = {g: float(jnp.linalg.norm(qlora.dequantize(qlora.quantize(w, 4, 64, grid=g)) - w))
         for g in qlora.GRIDS}
  assert err["nf4"] < 0.9 * err["int"]


def test_double_quantization_of_the_scales():
  w = np.random.default_rng(3).normal(size=(640, 8)).astype(np.float32)  # 10 x 8 scales
  plain = qlora.quantize(jnp.asarray(w), 4, 64, grid="nf4")
  dq = qlora.quantize(jnp.asarray(w), 4, 64, grid="nf4", double_quant=True)
  assert dq.scale.dtype == np.int8 and dq.scale.shape == (10, 8)
  assert dq.scale_scale.shape == (1,)  # 80 scales: one block of 256
  c = np.asarray(plain.scale, np.float64)  # numpy: int8 absmax of c - mean(c)
  centered = c - c.mean()
  second = np.abs(centered).max() / 127
  np.testing.assert_array_equal(dq.scale, np.round(centered / second).astype(np.int8))
  got = np.asarray(qlora.block_scales(dq))
  np.testing.assert_allclose(got, np.round(centered / second) * second + c.mean(), rtol=1e-5)
  assert np.all(np.abs(got - c) <= second / 2 + 1e-6)
  # 4-bit codes + 1-byte scales + one float32 second-level scale + the float32 mean
  assert tree_bytes(dq) == 640 * 8 // 2 + 80 + 4 + 4
  np.testing.assert_allclose(qlora.dequantize(dq), qlora.dequantize(plain),
                             atol=float(second) + 1e-6)


def test_nf4_qlora_method_dequantizes_at_init():
  params = toy_params()
  method = qlora.method("query|value", 2, 4.0, bits=4, block_size=4, grid="nf4",
                        double_quant=True)
  frozen, adapters = method.init(jax.random.key(0), params)
  combined, _ = method.combine(frozen, adapters, None)
  for p, v in peft.flatten(frozen).items():
    if qlora.is_quantized(v):
      assert v.grid == "nf4" and v.scale_scale is not None
      np.testing.assert_allclose(peft.flatten(combined)[p], qlora.dequantize(v), rtol=1e-6)
  with pytest.raises(UserError, match="nf4"):
    qlora.method(bits=8, grid="nf4")
