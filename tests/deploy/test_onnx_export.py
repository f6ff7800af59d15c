"""ONNX export round trip: onnxruntime's logits against the JAX compacted model's, and
the integer tensors against DoReFa's integers computed here by hand in numpy.

Needs the ``[deploy]`` extra (onnx, onnxruntime); skipped without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from picpq_jax.compress.quantizers import LSQ, PACT, DoReFa
from picpq_jax.data import normalize
from picpq_jax.errors import UserError
from picpq_jax.models import get_model, model_structure
from picpq_jax.models.mobilenetv2 import MobileNetV2
from picpq_jax.models.resnet_imagenet import ImageNetResNet
from picpq_jax.models.vgg import CifarVGG
from tests.compress.test_compact import _random_masks
from tests.deploy.helpers import compacted as _compacted
from tests.models.conftest import random_variables

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from picpq_jax.deploy.onnx_export import build_onnx  # pylint: disable=wrong-import-position

def _run(proto, images):
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run(None, {"images": images})[0]


def _initializers(proto) -> dict[str, np.ndarray]:
  return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


SMALL_VGG = dict(cfg=(16, "M", 24, 24, "M", 32), hidden=24)
SMALL_MOBILENET = dict(cfg=((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2)), width_mult=0.5,
                       last_features=64)


@pytest.mark.parametrize("build", [
    lambda q: get_model("resnet8", quantizer=q),
    lambda q: CifarVGG(quantizer=q, **SMALL_VGG),
    lambda q: MobileNetV2(quantizer=q, **SMALL_MOBILENET),
    lambda q: ImageNetResNet(stage_sizes=(1, 2), widths=(16, 24), num_classes=10, quantizer=q),
], ids=["resnet8", "vgg", "mobilenetv2", "imagenet_resnet"])
def test_onnx_logits_match_the_compacted_jax_model(build, images):
  """2-8-bit DoReFa layers, random channels pruned: onnxruntime on uint8 images gives
  the compacted model's logits on the normalized images. The convolutions sum in
  another order, so a value within float rounding of a rounding boundary may land
  on the next level; the bound allows a few such flips, not a wrong grid (one
  level of a 2-bit activation is a third of its range)."""
  x, mean, std = images
  model, variables = _compacted(build(DoReFa()), seed=3)
  expected = np.asarray(model.apply(variables, normalize(x, mean, std)))
  got = _run(build_onnx(model, variables, mean, std), x)
  assert got.shape == expected.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
  assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 15 / 16


def test_float_model_matches_to_float_rounding(images):
  """A full-precision (unquantized, uncompacted) ResNet-20: the same function."""
  x, mean, std = images
  model = get_model("resnet20")
  variables = random_variables(jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)), 5)
  expected = np.asarray(model.apply(variables, normalize(x, mean, std)))
  got = _run(build_onnx(model, variables, mean, std), x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_integer_weights_and_activations_at_the_planned_bits(images):
  """Each quantized kernel is int4 (up to 4 bits) or int8 codes
  ``round(n tanh(W) / max|tanh W|)``,
  ``n = 2^(k-1) - 1`` (numpy, from the compacted float kernel), scale ``1/n``, read
  by DequantizeLinear; each quantized input is Clip(0, 1) * (2^k - 1) into a
  uint8 QuantizeLinear; full-precision layers keep float32 kernels."""
  _, mean, std = images
  model, variables = _compacted(get_model("resnet8", quantizer=DoReFa()), seed=4)
  proto = build_onnx(model, variables, mean, std)
  inits = _initializers(proto)
  nodes = {n.name: n for n in proto.graph.node}
  checked = 0
  for layer, quant in _flat_quant(variables["quant"]).items():
    k = int(quant["w_bits"])
    kernel = np.asarray(_lookup(variables["params"], layer)["kernel"], np.float64)
    if k >= 32:
      assert f"{layer}/kernel" in inits and inits[f"{layer}/kernel"].dtype == np.float32
      assert f"{layer}/kernel_q" not in inits
      continue
    n = 2 ** (k - 1) - 1
    t = np.tanh(kernel)
    codes = np.round(t / np.abs(t).max() * n)
    got = inits[f"{layer}/kernel_q"]
    assert got.dtype == (ml_dtypes.int4 if k <= 4 else np.int8)
    got = got.astype(np.int64)
    assert np.abs(got).max() <= n
    onnx_layout = (3, 2, 0, 1) if kernel.ndim == 4 else (0, 1)
    np.testing.assert_array_equal(got, codes.transpose(onnx_layout))
    np.testing.assert_allclose(inits[f"{layer}/kernel_scale"], 1 / n, rtol=1e-6)
    assert nodes[f"{layer}/kernel_dq"].op_type == "DequantizeLinear"
    a = int(quant["a_bits"])
    assert inits[f"{layer}/a_levels"] == np.float32(2**a - 1)
    assert inits[f"{layer}/a_hi"] == 1 and inits[f"{layer}/a_zero_point"].dtype == np.uint8
    assert nodes[f"{layer}/a_codes"].op_type == "QuantizeLinear"
    checked += 1
  assert checked >= 6


def test_activation_codes_fit_their_bits(images):
  """The uint8 tensors that QuantizeLinear writes hold only 0 .. 2^k - 1, and they are
  DoReFa's codes of the layer's input as JAX computes it."""
  x, mean, std = images
  model, variables = _compacted(get_model("resnet8", quantizer=DoReFa()), seed=6)
  proto = build_onnx(model, variables, mean, std)
  layer = "stage2_block0/conv2"
  a = int(_flat_quant(variables["quant"])[layer]["a_bits"])
  codes_name = f"{layer}/a_codes"
  proto.graph.output.append(onnx.helper.make_tensor_value_info(
      codes_name, onnx.TensorProto.UINT8, None))
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  codes = session.run([codes_name], {"images": x})[0]
  assert codes.dtype == np.uint8 and codes.max() <= 2**a - 1 and codes.max() > 0

  inputs = {}
  def record(next_fun, args, kwargs, context):
    if "/".join(context.module.path) == layer and context.method_name == "__call__":
      inputs["x"] = args[0]
    return next_fun(*args, **kwargs)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  with nn.intercept_methods(record):
    model.apply(variables, normalize(x, mean, std))
  expected = np.round(np.clip(np.asarray(inputs["x"]), 0, 1) * (2**a - 1))  # NHWC
  agree = np.mean(codes == expected.transpose(0, 3, 1, 2))
  assert agree > 0.999, agree


@pytest.mark.parametrize("quantizer", [PACT(alpha_init=3.0), LSQ()], ids=["pact", "lsq"])
def test_other_quantizers_round_trip(quantizer, images):
  """PACT (learnt clip) and LSQ (learnt steps) map onto integer grids too."""
  x, mean, std = images
  model, variables = _compacted(get_model("resnet8", quantizer=quantizer), seed=7)
  expected = np.asarray(model.apply(variables, normalize(x, mean, std)))
  got = _run(build_onnx(model, variables, mean, std), x)
  np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())


def test_split_pieces_and_uncompacted_models_raise(images):
  _, mean, std = images
  model = get_model("resnet8").clone(span=(0, 2))
  with pytest.raises(UserError, match="whole model"):
    build_onnx(model, {}, mean, std)
  model = get_model("resnet8", quantizer=DoReFa())
  variables = random_variables(jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)), 1)
  variables["masks"] = _random_masks(model_structure(model, (32, 32, 3)), 1)
  with pytest.raises(UserError, match="compact the model"):
    build_onnx(model, variables, mean, std)


def _flat_quant(quant) -> dict[str, dict]:
  """``{"stage1_block0/conv1": {"w_bits", "a_bits"}, ...}``."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(quant):
    out.setdefault("/".join(k.key for k in path[:-1]), {})[path[-1].key] = leaf
  return out


def _lookup(tree, layer: str):
  for key in layer.split("/"):
    tree = tree[key]
  return tree
