"""Communication counts from shapes and dtypes, and the k-bit message quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.federated import comm
from picpq_jax.federated.quantize import quantize_message


def test_message_bytes_raw_and_packed():
  assert comm.message_bytes((32, 32, 32, 16), jnp.float32) == 32 * 32 * 32 * 16 * 4
  assert comm.message_bytes((3,), jnp.int32) == 12
  assert comm.message_bytes((5,), jnp.uint8) == 5
  assert comm.message_bytes((10,), jnp.float32, bits=4) == 5 + 8  # 40 bits + range
  assert comm.message_bytes((3,), jnp.float32, bits=3) == 2 + 8  # 9 bits round up
  tree = {"a": jnp.zeros((2, 3)), "b": [jax.ShapeDtypeStruct((4,), jnp.int32)]}
  assert comm.tree_bytes(tree) == 24 + 16


def test_split_traffic_counts_each_message():
  smashed = jax.ShapeDtypeStruct((32, 32, 32, 16), jnp.float32)
  labels = jax.ShapeDtypeStruct((32,), jnp.int32)
  state = {"w": jnp.zeros((100,)), "bn": jnp.zeros((10,))}
  t = comm.split_traffic(smashed, labels, state, participants=3, local_steps=5, bits=8)
  per_msg = 32 * 32 * 32 * 16 + 8
  assert t.up == {"smashed": 15 * per_msg, "labels": 15 * 128, "client_model": 3 * 440}
  assert t.down == {"gradients": 15 * per_msg, "client_model": 3 * 440}
  assert t.total_bytes == t.up_bytes + t.down_bytes == 2 * 15 * per_msg + 15 * 128 + 6 * 440
  fp32 = comm.split_traffic(smashed, labels, state, 3, 5)
  assert fp32.up["smashed"] == 15 * 32 * 32 * 32 * 16 * 4


def test_fedavg_and_centralized_traffic():
  t = comm.fedavg_traffic({"w": jnp.zeros((7,), jnp.float32)}, participants=4)
  assert t.up_bytes == t.down_bytes == 4 * 28
  images = jax.ShapeDtypeStruct((10, 32, 32, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((10,), jnp.int32)
  assert comm.centralized_traffic(images, labels, True).up_bytes == 10 * 3072 + 40
  assert comm.centralized_traffic(images, labels, False).total_bytes == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_message_levels_error_and_range(bits):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  q = quantize_message(x, jnp.int32(bits))
  lo, hi = float(x.min()), float(x.max())
  assert len(np.unique(np.asarray(q))) <= 2 ** bits
  assert float(q.min()) == pytest.approx(lo) and float(q.max()) == pytest.approx(hi)
  step = (hi - lo) / (2 ** bits - 1)
  assert float(jnp.abs(q - x).max()) <= step / 2 + 1e-5


def test_quantize_message_full_precision_and_straight_through():
  x = jnp.linspace(-1.0, 3.0, 50)
  assert np.array_equal(np.asarray(quantize_message(x, jnp.int32(32))), np.asarray(x))
  g = jax.grad(lambda v: jnp.sum(quantize_message(v, jnp.int32(4)) * jnp.arange(50.0)))(x)
  np.testing.assert_allclose(np.asarray(g), np.arange(50.0), rtol=1e-5)
  const = jnp.full((5,), 2.5)
  assert np.array_equal(np.asarray(quantize_message(const, jnp.int32(4))), np.asarray(const))


def test_quantize_message_sends_only_the_kept_channels():
  """Range over the kept channels only, pruned channels 0, against a numpy transcription."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
  x[..., 1] = 50.0  # a pruned channel outside the kept range must not widen it
  keep = np.array([1, 0, 1, 1, 0], np.float32)
  q = np.asarray(quantize_message(jnp.asarray(x), jnp.int32(3), jnp.asarray(keep)))
  kept = x[..., keep > 0]
  lo, hi = kept.min(), kept.max()
  levels = np.round((kept - lo) / (hi - lo) * 7) / 7 * (hi - lo) + lo
  np.testing.assert_allclose(q[..., keep > 0], levels, rtol=1e-5, atol=1e-6)
  assert not q[..., keep == 0].any()
  full = np.asarray(quantize_message(jnp.asarray(x), jnp.int32(32), jnp.asarray(keep)))
  np.testing.assert_array_equal(full, x * keep)
  ones = jnp.ones((5,), jnp.float32)
  np.testing.assert_array_equal(np.asarray(quantize_message(jnp.asarray(x), jnp.int32(4), ones)),
                                np.asarray(quantize_message(jnp.asarray(x), jnp.int32(4))))
