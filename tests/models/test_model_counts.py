"""Parameter counts and MACs against published figures and hand computations.

Parameters count kernels, biases and BN scale/shift (not running statistics), as
PyTorch's ``sum(p.numel() for p in model.parameters())`` does. MACs count conv and
dense layers: ``h_out * w_out * c_in * c_out * k * k / groups``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from picpq_jax.models import param_count


def cifar_resnet_macs(depth: int) -> int:
  """Stem, three stages of (depth-2)/6 blocks at 32/16/8 pixels, 64->10 head."""
  n = (depth - 2) // 6
  macs = 32 * 32 * 3 * 16 * 9
  for hw, cin, c in ((32, 16, 16), (16, 16, 32), (8, 32, 64)):
    macs += hw * hw * cin * c * 9 + hw * hw * c * c * 9  # first block
    macs += (n - 1) * 2 * hw * hw * c * c * 9
  return macs + 64 * 10


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def vgg16_macs_and_params(num_classes: int = 10) -> tuple[int, int]:
  """Sum over convs of H*W*Cin*Cout*9 (H halves after each 'M'), plus 512-512-10 dense."""
  hw, cin, macs, params = 32, 3, 0, 0
  for v in VGG16_CFG:
    if v == "M":
      hw //= 2
      continue
    macs += hw * hw * cin * v * 9
    params += 9 * cin * v + v + 2 * v  # kernel, bias, BN scale and shift
    cin = v
  macs += 512 * 512 + 512 * num_classes
  params += 512 * 512 + 512 + 2 * 512 + 512 * num_classes + num_classes
  return macs, params


MOBILENETV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                   (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenetv2_macs() -> int:
  """Stem 3x3 at 32 px; per block [1x1 expand], 3x3 depthwise at the output size, 1x1 project."""
  hw, cin = 32, 32
  macs = hw * hw * 3 * cin * 9
  for t, c, n, s in MOBILENETV2_CFG:
    for b in range(n):
      hidden = cin * t
      if t != 1:
        macs += hw * hw * cin * hidden
      hw //= s if b == 0 else 1
      macs += hw * hw * hidden * 9 + hw * hw * hidden * c
      cin = c
  return macs + hw * hw * cin * 1280 + 1280 * 10


def resnet18_macs() -> int:
  """7x7/2 stem at 112 px, 3x3 convs at 56/28/14/7 px, 1x1/2 shortcuts, 512->1000 head."""
  macs = 112 * 112 * 3 * 64 * 49
  cin = 64
  for hw, c in ((56, 64), (28, 128), (14, 256), (7, 512)):
    macs += hw * hw * cin * c * 9 + 3 * hw * hw * c * c * 9
    if cin != c:
      macs += hw * hw * cin * c
    cin = c
  return macs + 512 * 1000


# name -> (parameters, MACs, MACs as published, relative tolerance on the published figure)
EXPECTED = {
    "resnet20": (269_722, cifar_resnet_macs(20), 40.55e6, 1e-3),
    "resnet56": (853_018, cifar_resnet_macs(56), 125.49e6, 1e-3),
    "vgg16": (vgg16_macs_and_params()[1], vgg16_macs_and_params()[0], 313e6, 5e-3),
    # torchvision's mobilenet_v2 has 3,504,872 parameters with a 1280->1000 head.
    "mobilenetv2": (3_504_872 - 1_281_000 + 12_810, mobilenetv2_macs(), 92e6, 0.07),
    # torchvision: 11,689,512 parameters, 1.81 GFLOPS; the PIC-PQ paper: 1.82G.
    "resnet18": (11_689_512, resnet18_macs(), 1.82e9, 5e-3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_and_macs(name, abstract_model):
  _, _, variables, structure = abstract_model(name)
  params, macs, published, rtol = EXPECTED[name]
  assert param_count(variables["params"]) == params
  assert structure.macs == macs
  assert structure.macs == pytest.approx(published, rel=rtol)


def test_published_orders_of_magnitude():
  assert EXPECTED["vgg16"][0] == pytest.approx(15.0e6, rel=0.01)
  assert EXPECTED["mobilenetv2"][0] == pytest.approx(2.24e6, rel=0.01)
  assert resnet18_macs() == pytest.approx(1.814e9, rel=1e-3)


def _valid_tap_macs(layer) -> int:
  """MACs counting only kernel taps that land inside the (unpadded) input.

  XLA's cost analysis counts a convolution's work this way, so padding taps at the
  border are left out; QConv pads ``k // 2`` on every side.
  """
  def taps(size_in, size_out, k, s):
    p = k // 2
    return sum(1 for o in range(size_out) for t in range(k) if 0 <= o * s - p + t < size_in)

  if layer.kind == "dense":
    return layer.macs
  (ih, iw), (oh, ow) = layer.in_hw, layer.out_hw
  (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
  per_pixel = layer.in_features // layer.feature_group_count * layer.out_features
  return taps(ih, oh, kh, sh) * taps(iw, ow, kw, sw) * per_pixel


@functools.cache
def _xla_flops(name, abstract_model) -> float:
  model, spec, variables, _ = abstract_model(name)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def test_xla_flops_resnet20_about_twice_macs(abstract_model):
  """Independent of the declared graph: XLA counts what the compiled program does."""
  structure = abstract_model("resnet20")[3]
  assert 0.9 < _xla_flops("resnet20", abstract_model) / (2 * structure.macs) < 1.1


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenetv2"])
def test_xla_flops_match_layers_up_to_padding(name, abstract_model):
  """2 flops per valid-tap MAC, plus a few percent for BN, activations, adds, pools."""
  structure = abstract_model(name)[3]
  expected = 2 * sum(_valid_tap_macs(l) for l in structure.layers)
  assert 1.0 <= _xla_flops(name, abstract_model) / expected < 1.08
