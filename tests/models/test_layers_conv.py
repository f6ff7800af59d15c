"""conv2d: tiny maps run as one matmul over shifted taps, equal to a direct convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from picpq_jax.models.layers import TINY_MAP_PIXELS, conv2d, conv_taps_matmul


def numpy_conv(x, w, padding):
  """Direct cross-correlation, stride 1, in float64: x [N,H,W,C], w [kh,kw,C,O]."""
  (top, bottom), (left, right) = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw = w.shape[:2]
  h_out, w_out = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  out = np.zeros((x.shape[0], h_out, w_out, w.shape[3]))
  for i in range(h_out):
    for j in range(w_out):
      patch = xp[:, i:i + kh, j:j + kw, :]  # [N, kh, kw, C]
      out[:, i, j, :] = np.einsum("nabc,abco->no", patch, w.astype(np.float64))
  return out


@pytest.mark.parametrize("hw,kernel,padding", [
    ((2, 2), (3, 3), ((1, 1), (1, 1))),   # VGG-16's last block on 32x32 inputs
    ((1, 1), (3, 3), ((1, 1), (1, 1))),
    ((2, 1), (3, 3), ((1, 1), (1, 1))),
    ((3, 3), (3, 3), ((0, 0), (0, 0))),   # one output pixel, no padding
    ((2, 3), (1, 1), ((0, 0), (0, 0))),
    ((4, 4), (3, 3), ((1, 0), (2, 1))),   # asymmetric padding, 12 output pixels
])
def test_conv_taps_matmul_equals_direct_convolution(hw, kernel, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, *hw, 5)).astype(np.float32)
  w = rng.normal(size=(*kernel, 5, 7)).astype(np.float32)
  got = np.asarray(conv_taps_matmul(jnp.asarray(x), jnp.asarray(w), padding))
  np.testing.assert_allclose(got, numpy_conv(x, w, padding), rtol=1e-5, atol=1e-5)


def _primitives(fn, *args):
  return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


def test_conv2d_dispatches_on_output_pixels():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  pad = ((1, 1), (1, 1))
  tiny = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
  assert 2 * 2 <= TINY_MAP_PIXELS
  assert "conv_general_dilated" not in _primitives(lambda x: conv2d(x, w, (1, 1), pad), tiny)
  np.testing.assert_allclose(np.asarray(conv2d(tiny, w, (1, 1), pad)),
                             numpy_conv(np.asarray(tiny), np.asarray(w), pad), rtol=1e-5, atol=1e-5)
  large = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)  # 9 output pixels
  assert "conv_general_dilated" in _primitives(lambda x: conv2d(x, w, (1, 1), pad), large)
  # strided, grouped and string-padded convs always go to lax
  assert "conv_general_dilated" in _primitives(lambda x: conv2d(x, w, (2, 2), pad), tiny)
  dw = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)
  assert "conv_general_dilated" in _primitives(lambda x: conv2d(x, dw, (1, 1), pad, 4), tiny)
  assert "conv_general_dilated" in _primitives(lambda x: conv2d(x, w, (1, 1), "SAME"), tiny)


def test_conv2d_gradients_match_lax_on_tiny_maps():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 2, 2, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 5)), jnp.float32)
  pad = ((1, 1), (1, 1))
  t = jnp.asarray(rng.normal(size=(4, 2, 2, 5)), jnp.float32)

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) * t)

  ours = jax.grad(loss(lambda x, w: conv2d(x, w, (1, 1), pad)), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
