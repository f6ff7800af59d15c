"""Convolution algorithms per shape: each equals a direct convolution, the tuned
choice follows the timings, and conv2d runs the installed one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.models import QConv, conv_algorithms
from tests.models.test_layers_conv import numpy_conv

PADS = ((1, 1), (1, 1))


@pytest.mark.parametrize("hw,kernel,padding", [
    ((6, 5), (3, 3), ((1, 1), (1, 1))),
    ((4, 4), (3, 3), ((1, 0), (2, 1))),   # asymmetric padding
    ((3, 3), (3, 3), ((0, 0), (0, 0))),
    ((5, 4), (1, 1), ((0, 0), (0, 0))),
])
def test_output_taps_equals_direct_convolution(hw, kernel, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *hw, 5)).astype(np.float32)
  w = rng.normal(size=(*kernel, 5, 3)).astype(np.float32)
  got = conv_algorithms.conv_output_taps(jnp.asarray(x), jnp.asarray(w), padding)
  np.testing.assert_allclose(np.asarray(got), numpy_conv(x, w, padding), rtol=1e-5, atol=1e-5)


def _conv_layer():
  layer = QConv(features=3, kernel_size=(3, 3))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 4)), jnp.float32)
  return layer, layer.init(jax.random.key(0), x), x


@pytest.mark.parametrize("algorithm,primitive", [("output_taps", "dot_general"),
                                                 ("input_taps", "concatenate")])
def test_conv2d_runs_the_installed_algorithm(algorithm, primitive):
  layer, variables, x = _conv_layer()
  key = conv_algorithms.shape_key(x.shape, (3, 3, 4, 3), PADS, jnp.float32)
  want = numpy_conv(np.asarray(x), np.asarray(variables["params"]["kernel"]), PADS)
  with conv_algorithms.use({key: algorithm}):
    jaxpr = str(jax.make_jaxpr(layer.apply)(variables, x))
    got = layer.apply(variables, x)
  assert "conv_general_dilated" not in jaxpr and primitive in jaxpr
  assert "conv_general_dilated" in str(jax.make_jaxpr(layer.apply)(variables, x))  # restored
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown"):
    with conv_algorithms.use({key: "winograd"}):
      pass


def test_tune_keeps_xla_unless_clearly_faster(monkeypatch):
  layer, variables, x = _conv_layer()
  key = conv_algorithms.shape_key(x.shape, (3, 3, 4, 3), PADS, jnp.float32)
  timings = {"xla": 1.0, "input_taps": 0.95, "output_taps": 2.0}
  monkeypatch.setattr(conv_algorithms, "time_algorithms", lambda k, reps, opts: dict(timings))
  results = conv_algorithms.tune(layer.apply, variables, x)
  assert list(results) == [key] and results[key]["algorithm"] == "xla"  # 5% is noise
  timings["output_taps"] = 0.5
  assert conv_algorithms.chosen(conv_algorithms.tune(layer.apply, variables, x)) == {
      key: "output_taps"}
