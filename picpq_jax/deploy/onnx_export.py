"""ONNX export of a (compacted, quantized) model, with integer weights and activations.

:func:`export_onnx` writes the graph op by op from the model's own structure (no
generic converter), in NCHW as ONNX runtimes expect:

* input ``images``: uint8 ``[N, H, W, C]`` as the datasets hold them; the graph
  casts, normalizes ``(x / 255 - mean) / std`` (:func:`picpq_jax.data.normalize`)
  and transposes to NCHW; output ``logits``: float32 ``[N, classes]``.
* a conv/dense layer with ``w_bits < 32``: its fake-quantized kernel is stored as
  integer codes ``q`` (int4 up to 4 bits, two a byte; int8 up to 8, int16 up to
  16, else int32) with one float scale ``s``, ``w = s * q``
  (:func:`~picpq_jax.compress.export.weight_codes`; DoReFa's ``k``-bit weights are
  ``q / (2^(k-1) - 1)``, ``|q| <= 2^(k-1) - 1``), read through ``DequantizeLinear``;
* a layer with ``a_bits = k < 32``: its input is clipped and scaled to the
  quantizer's integer levels ``0 .. 2^k - 1`` in the quantizer's own order of
  operations (DoReFa: ``clip(x, 0, 1) * (2^k - 1)``), rounded half to even by
  ``QuantizeLinear`` (scale 1, zero point 0) into uint8 codes (uint16 above 8
  bits), and read through ``DequantizeLinear`` with the grid's scale (DoReFa:
  ``1 / (2^k - 1)``; PACT: ``alpha / (2^k - 1)``; LSQ: its step ``s``);
* full-precision layers, biases and BatchNorm (``BatchNormalization``, inference
  mode, epsilon ``1e-5``) stay float32.

``QuantizeLinear`` rounds half to even, as
:func:`~picpq_jax.compress.numerics.round_ste` does, and computing the levels
before it (rather than dividing by a scale of ``1 / (2^k - 1)`` inside it, which
rounds differently for about 1 value in 10^5 at 8 bits) gives the same codes as
JAX for the same input. The convolutions still sum in another order, so a value
within float rounding of a rounding boundary can land on the neighbouring level.

Supported: every model of the registry: the CIFAR ResNets (option-A shortcuts,
including a compacted model's ``shortcut_maps``), the ImageNet ResNet-18 (1x1
projection shortcuts), VGG (:class:`~picpq_jax.models.vgg.CifarVGG`) and the CIFAR
MobileNetV2 (depthwise convs as grouped ``Conv``, ReLU6 as ``Clip(0, 6)``); other
modules raise :class:`~picpq_jax.errors.UserError`. Requires the ``[deploy]``
extra (``onnx``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from picpq_jax.compress.export import Prequantized, weight_codes
from picpq_jax.compress.quantizers import LSQ, PACT, DoReFa
from picpq_jax.errors import UserError
from picpq_jax.models.layers import BN_EPSILON
from picpq_jax.models.quantizer import FULL_PRECISION_BITS, FullPrecision, Quantizer
from picpq_jax.models.mobilenetv2 import MobileNetV2, make_divisible
from picpq_jax.models.resnet_cifar import CifarResNet
from picpq_jax.models.resnet_imagenet import ImageNetResNet
from picpq_jax.models.structure import LayerInfo, model_structure
from picpq_jax.models.vgg import CifarVGG

OPSET = 21  # QuantizeLinear/DequantizeLinear with int16/uint16; onnxruntime >= 1.17
SUPPORTED = ("the ResNets", "vgg16", "mobilenetv2")


def _onnx():
  """The ``onnx`` module, or a UserError saying how to install it."""
  try:
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("ONNX export needs the onnx package: pip install 'picpq-jax[deploy]'"
                    ) from None
  return onnx


def _int_dtype(bits: int, signed: bool) -> np.dtype:
  """Smallest ONNX-quantizable integer dtype holding ``bits``-bit codes."""
  if bits <= 8:
    return np.dtype(np.int8 if signed else np.uint8)
  if bits <= 16:
    return np.dtype(np.int16 if signed else np.uint16)
  if signed:
    return np.dtype(np.int32)
  raise UserError(f"activations at {bits} bits have no ONNX integer type (uint8/uint16); "
                  "use at most 16 activation bits or 32 (full precision)")


class _Graph:
  """Nodes and initializers of one ONNX graph, with unique names."""

  def __init__(self):
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self.names: set[str] = set()

  def _fresh(self, hint: str) -> str:
    name, k = hint, 1
    while name in self.names:
      k += 1
      name = f"{hint}_{k}"
    self.names.add(name)
    return name

  def const(self, hint: str, value: np.ndarray) -> str:
    """An initializer holding ``value`` (its dtype kept); returns its name."""
    name = self._fresh(hint)
    self.initializers.append(_onnx().numpy_helper.from_array(np.asarray(value), name))
    return name

  def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
    """Appends a one-output node; returns the output's name."""
    out = self._fresh(hint)
    self.nodes.append(_onnx().helper.make_node(op_type, inputs, [out], name=out, **attrs))
    return out


@dataclasses.dataclass(frozen=True)
class Context:
  """What every layer reads: the flat variables, the quantizer and the structure."""

  flat: Mapping[str, np.ndarray]  # '/'-joined paths, e.g. "params/stem_conv/kernel"
  quantizer: Quantizer  # the model's (possibly Prequantized) quantizer
  layers: Mapping[str, LayerInfo]


def _bits(ctx: Context, layer: str, which: str) -> int:
  return int(np.asarray(ctx.flat[f"quant/{layer}/{which}"]))


def _qparams(ctx: Context, layer: str) -> dict[str, Any]:
  prefix = f"params/{layer}/"
  return {p[len(prefix):]: jnp.asarray(v) for p, v in ctx.flat.items()
          if p.startswith(prefix) and p[len(prefix):] not in ("kernel", "bias")}


def _activation_levels(g: _Graph, x: str, quantizer: Quantizer, bits: int,
                       qparams: Mapping[str, Any], layer: str) -> tuple[str, np.float32]:
  """A quantizer's activation grid at ``bits`` (< 32), as ONNX ops.

  Returns ``(levels, scale)``: ``levels`` holds the integer levels as floats in
  ``[0, 2^k - 1]`` (``k = max(bits, 1)``), computed in the quantizer's own order
  of operations so that they round exactly as in JAX; the quantized activation
  is ``scale * levels``. DoReFa: ``clip(x, 0, 1) * (2^k - 1)``, scale
  ``1 / (2^k - 1)``; PACT: ``clip(x, 0, alpha) / alpha * (2^k - 1)``, scale
  ``alpha / (2^k - 1)``; LSQ: ``clip(x / s, 0, 2^k - 1)``, scale ``s``.
  """
  base = quantizer.base if isinstance(quantizer, Prequantized) else quantizer
  n = np.float32(2 ** max(bits, 1) - 1)
  const = lambda leaf, v: g.const(f"{layer}/{leaf}", np.asarray(v, np.float32))
  clip = lambda v, hi: g.op("Clip", [v, const("a_lo", 0), const("a_hi", hi)], f"{layer}/a_clip")
  if isinstance(base, DoReFa):
    x = g.op("Mul", [clip(x, 1), const("a_levels", n)], f"{layer}/a_levels")
    return x, np.float32(1) / n
  if isinstance(base, PACT):
    alpha = np.float32(np.asarray(qparams["pact_alpha"]))
    x = g.op("Div", [clip(x, alpha), const("a_alpha", alpha)], f"{layer}/a_unit")
    return g.op("Mul", [x, const("a_levels", n)], f"{layer}/a_levels"), alpha / n
  if isinstance(base, LSQ):
    step = np.float32(np.asarray(qparams["lsq_a_step"]))
    x = g.op("Div", [x, const("a_step", step)], f"{layer}/a_steps")
    return clip(x, n), step
  raise UserError(f"ONNX export knows the activation grids of DoReFa, PACT and LSQ, not "
                  f"{type(base).__name__}; export with one of those")


def _quantized_input(g: _Graph, ctx: Context, x: str, layer: str) -> str:
  """``x`` at the layer's ``a_bits``: its integer levels through ``QuantizeLinear``
  (scale 1, zero point 0) to uint8 codes ``0 .. 2^k - 1``, then
  ``DequantizeLinear`` with the grid's scale."""
  bits = _bits(ctx, layer, "a_bits")
  if bits >= FULL_PRECISION_BITS:
    return x
  levels, scale = _activation_levels(g, x, ctx.quantizer, bits, _qparams(ctx, layer), layer)
  zero = g.const(f"{layer}/a_zero_point", np.zeros((), _int_dtype(bits, signed=False)))
  codes = g.op("QuantizeLinear", [levels, g.const(f"{layer}/a_unit_scale", np.float32(1)),
                                  zero], f"{layer}/a_codes")
  s = g.const(f"{layer}/a_scale", np.asarray(scale, np.float32))
  return g.op("DequantizeLinear", [codes, s, zero], f"{layer}/a_dq")


def quantized_kernel(ctx: Context, layer: str) -> tuple[np.ndarray, np.float32] | None:
  """Integer codes and scale of a layer's fake-quantized kernel; ``None`` at 32 bits.

  Returns:
    ``(codes, scale)``: codes of the kernel's shape (HWIO or ``[I, O]``) in the
    smallest signed type of :func:`_int_dtype`, within ``[-2^(b-1), 2^(b-1))``,
    with ``scale * codes`` equal to ``quantizer.weights(kernel)`` to within
    ``1e-6`` relative (float32).
  """
  bits = _bits(ctx, layer, "w_bits")
  if bits >= FULL_PRECISION_BITS:
    return None
  kernel = jnp.asarray(ctx.flat[f"params/{layer}/kernel"])
  wq = ctx.quantizer.weights(kernel, jnp.asarray(bits, jnp.int32), _qparams(ctx, layer))
  codes, scale, half = weight_codes(np.asarray(wq), bits, name=layer)
  if half:
    raise UserError(f"{layer}: the quantized weights skip zero (levels (q + 1/2) * s); "
                    "ONNX integer weights need a grid through zero")
  return codes.astype(_int_dtype(bits, signed=True)), scale


def _kernel(g: _Graph, ctx: Context, layer: str, to_onnx: tuple[int, ...]) -> str:
  """The layer's kernel in ONNX layout (``transpose(to_onnx)``): float32, or integer
  codes (int4 at up to 4 bits, else :func:`_int_dtype`'s) through DequantizeLinear
  when ``w_bits < 32``."""
  quantized = quantized_kernel(ctx, layer)
  if quantized is None:
    kernel = np.asarray(ctx.flat[f"params/{layer}/kernel"], np.float32)
    return g.const(f"{layer}/kernel", kernel.transpose(to_onnx))
  codes, scale = quantized
  if _bits(ctx, layer, "w_bits") <= 4:  # two codes a byte in the file
    codes = codes.astype(ml_dtypes.int4)
  q = g.const(f"{layer}/kernel_q", np.ascontiguousarray(codes.transpose(to_onnx)))
  s = g.const(f"{layer}/kernel_scale", np.asarray(scale, np.float32))
  zero = g.const(f"{layer}/kernel_zero_point", np.zeros((), codes.dtype))
  return g.op("DequantizeLinear", [q, s, zero], f"{layer}/kernel_dq")


def _conv(g: _Graph, ctx: Context, x: str, layer: str) -> str:
  """A :class:`~picpq_jax.models.layers.QConv` (default padding ``k // 2``), NCHW."""
  info = ctx.layers[layer]
  x = _quantized_input(g, ctx, x, layer)
  inputs = [x, _kernel(g, ctx, layer, (3, 2, 0, 1))]  # HWIO -> OIHW
  if info.use_bias:
    inputs.append(g.const(f"{layer}/bias", np.asarray(ctx.flat[f"params/{layer}/bias"],
                                                      np.float32)))
  pads = [k // 2 for k in info.kernel_size] * 2
  return g.op("Conv", inputs, f"{layer}/conv", kernel_shape=list(info.kernel_size),
              strides=list(info.strides), pads=pads, group=info.feature_group_count)


def _dense(g: _Graph, ctx: Context, x: str, layer: str) -> str:
  """A :class:`~picpq_jax.models.layers.QDense` on ``[N, I]``: Gemm."""
  info = ctx.layers[layer]
  inputs = [_quantized_input(g, ctx, x, layer), _kernel(g, ctx, layer, (0, 1))]
  if info.use_bias:
    inputs.append(g.const(f"{layer}/bias", np.asarray(ctx.flat[f"params/{layer}/bias"],
                                                      np.float32)))
  return g.op("Gemm", inputs, f"{layer}/gemm")


def _batch_norm(g: _Graph, ctx: Context, x: str, name: str) -> str:
  """Flax BatchNorm with running statistics: ONNX BatchNormalization (axis 1)."""
  inputs = [x] + [g.const(f"{name}/{leaf}", np.asarray(ctx.flat[f"{col}/{name}/{leaf}"],
                                                       np.float32))
                  for col, leaf in (("params", "scale"), ("params", "bias"),
                                    ("batch_stats", "mean"), ("batch_stats", "var"))]
  return g.op("BatchNormalization", inputs, f"{name}/bn", epsilon=BN_EPSILON)


def _shortcut(g: _Graph, x: str, index: tuple[int, ...], stride: int, name: str) -> str:
  """Option A on NCHW: subsample by ``stride``, channel ``j`` = ``x[:, index[j]]`` or
  zeros where ``index[j] == -1`` (:func:`~picpq_jax.models.resnet_cifar.index_shortcut`)."""
  if stride != 1:
    big = np.int64(2**62)
    x = g.op("Slice", [x, g.const(f"{name}/starts", np.array([0, 0], np.int64)),
                       g.const(f"{name}/ends", np.array([big, big], np.int64)),
                       g.const(f"{name}/axes", np.array([2, 3], np.int64)),
                       g.const(f"{name}/steps", np.array([stride, stride], np.int64))],
             f"{name}/subsample")
  idx = np.asarray(index, np.int64)
  x = g.op("Gather", [x, g.const(f"{name}/index", np.maximum(idx, 0))], f"{name}/gather",
           axis=1)
  if (idx < 0).any():
    keep = (idx >= 0).astype(np.float32).reshape(1, -1, 1, 1)
    x = g.op("Mul", [x, g.const(f"{name}/keep", keep)], f"{name}/zero_pad")
  return x


def _basic_block(g: _Graph, ctx: Context, x: str, name: str, shortcut: str) -> str:
  """conv1-BN-ReLU-conv2-BN of :class:`~picpq_jax.models.resnet_cifar.BasicBlock`,
  plus ``shortcut``, then ReLU."""
  y = _conv(g, ctx, x, f"{name}/conv1")
  y = g.op("Relu", [_batch_norm(g, ctx, y, f"{name}/bn1")], f"{name}/relu1")
  y = _batch_norm(g, ctx, _conv(g, ctx, y, f"{name}/conv2"), f"{name}/bn2")
  return g.op("Relu", [g.op("Add", [y, shortcut], f"{name}/add")], f"{name}/relu2")


def _head(g: _Graph, ctx: Context, x: str) -> str:
  """Global average pool and the ``head`` dense layer: ``[N, C, H, W] -> [N, K]``."""
  x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pool")], "flatten")
  return _dense(g, ctx, x, "head")


def _resnet_cifar(g: _Graph, ctx: Context, model: CifarResNet, x: str) -> str:
  """CifarResNet's forward pass (see :mod:`picpq_jax.models.resnet_cifar`), NCHW."""
  blocks = (model.depth - 2) // 6
  couplings = model.shortcut_couplings()
  x = g.op("Relu", [_batch_norm(g, ctx, _conv(g, ctx, x, "stem_conv"), "stem_bn")], "stem_relu")
  for s in range(len(model.stage_widths())):
    for b in range(blocks):
      name = f"stage{s + 1}_block{b}"
      shortcut = x
      if s > 0 and b == 0:
        shortcut = _shortcut(g, x, couplings[s - 1].index, 2, f"{name}/shortcut")
      x = _basic_block(g, ctx, x, name, shortcut)
  return _head(g, ctx, x)


def _resnet_imagenet(g: _Graph, ctx: Context, model: ImageNetResNet, x: str) -> str:
  """ImageNetResNet's forward pass (see :mod:`picpq_jax.models.resnet_imagenet`), NCHW:
  7x7 stem, 3x3 max-pool, basic blocks with 1x1 projection shortcuts (option B)."""
  x = g.op("Relu", [_batch_norm(g, ctx, _conv(g, ctx, x, "stem_conv"), "stem_bn")], "stem_relu")
  x = g.op("MaxPool", [x], "stem_pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
  for s, blocks in enumerate(model.stage_sizes):
    for b in range(blocks):
      name = f"stage{s + 1}_block{b}"
      shortcut = x
      if f"params/{name}/downsample_conv/kernel" in ctx.flat:
        shortcut = _batch_norm(g, ctx, _conv(g, ctx, x, f"{name}/downsample_conv"),
                               f"{name}/downsample_bn")
      x = _basic_block(g, ctx, x, name, shortcut)
  return _head(g, ctx, x)


def _vgg(g: _Graph, ctx: Context, model: CifarVGG, x: str) -> str:
  """CifarVGG's forward pass (see :mod:`picpq_jax.models.vgg`), NCHW."""
  convs = 0
  for v in model.cfg:
    if v == "M":
      x = g.op("MaxPool", [x], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
      continue
    convs += 1
    name = f"layer{convs}"
    y = _batch_norm(g, ctx, _conv(g, ctx, x, f"{name}/conv"), f"{name}/bn")
    x = g.op("Relu", [y], f"{name}/relu")
  x = g.op("AveragePool", [x], "avgpool", kernel_shape=[2, 2], strides=[2, 2])
  x = g.op("Flatten", [g.op("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])], "flatten")
  x = g.op("Relu", [_batch_norm(g, ctx, _dense(g, ctx, x, "linear1"), "norm1")], "relu1")
  return _dense(g, ctx, x, "head")


def _relu6(g: _Graph, x: str, name: str) -> str:
  return g.op("Clip", [x, g.const(f"{name}/lo", np.float32(0)),
                       g.const(f"{name}/hi", np.float32(6))], name)


def _mobilenetv2(g: _Graph, ctx: Context, model: MobileNetV2, x: str) -> str:
  """MobileNetV2's forward pass (see :mod:`picpq_jax.models.mobilenetv2`), NCHW; which
  blocks add their input is decided on the uncompacted widths, as the model does."""
  conv_bn = lambda v, conv, bn: _batch_norm(g, ctx, _conv(g, ctx, v, conv), bn)
  width = make_divisible(model.stem_features * model.width_mult)
  x = _relu6(g, conv_bn(x, "stem_conv", "stem_bn"), "stem_relu6")
  for s, (t, c, n, first_stride) in enumerate(model.cfg):
    features = make_divisible(c * model.width_mult)
    for b in range(n):
      name = f"stage{s + 1}_block{b}"
      y = x
      if t != 1:
        y = _relu6(g, conv_bn(y, f"{name}/expand_conv", f"{name}/expand_bn"),
                   f"{name}/expand_relu6")
      y = _relu6(g, conv_bn(y, f"{name}/dw_conv", f"{name}/dw_bn"), f"{name}/dw_relu6")
      y = conv_bn(y, f"{name}/project_conv", f"{name}/project_bn")
      add_input = (first_stride if b == 0 else 1) == 1 and width == features
      x = g.op("Add", [y, x], f"{name}/add") if add_input else y
      width = features
  return _head(g, ctx, _relu6(g, conv_bn(x, "last_conv", "last_bn"), "last_relu6"))


WRITERS = ((CifarResNet, _resnet_cifar), (ImageNetResNet, _resnet_imagenet), (CifarVGG, _vgg),
           (MobileNetV2, _mobilenetv2))


def _check_supported(model: nn.Module) -> None:
  """Raises unless :func:`build_onnx` has a writer for ``model`` (whole, not a span)."""
  if getattr(model, "span", None) is not None:
    raise UserError("ONNX export needs the whole model (span=None), not a split piece")
  if isinstance(model, tuple(cls for cls, _ in WRITERS)):
    return
  raise UserError(f"ONNX export supports {', '.join(SUPPORTED)}, not "
                  f"{type(model).__name__}; export it as StableHLO (picpq export --formats "
                  "stablehlo, or export_stablehlo)")


def build_onnx(model: nn.Module, variables: Mapping[str, Any], mean, std,
               input_shape: tuple[int, int, int] = (32, 32, 3), name: str = "picpq"):
  """The ONNX ``ModelProto`` of ``model`` with ``variables`` (see the module doc).

  Args:
    model: a model of :mod:`picpq_jax.models` (compacted or not);
      its ``quantizer`` (or a :class:`~picpq_jax.compress.export.Prequantized`
      one, as :func:`~picpq_jax.compress.export.load_exported` returns) defines
      the weight and activation grids.
    variables: ``{"params", "batch_stats", "masks", "quant"}``; masks must be all
      ones (compact the model first).
    mean, std: float ``[C]`` normalization of the training images, ``[0, 1]`` units.
    input_shape: one image, ``(H, W, C)``.
    name: the graph's name.

  Returns:
    ``onnx.ModelProto`` (opset :data:`OPSET`), checked by ``onnx.checker``;
    input ``images`` uint8 ``[N, H, W, C]``, output ``logits`` float32 ``[N, K]``.
  """
  onnx = _onnx()
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  _check_supported(model)
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(variables), sep="/").items()}
  pruned = [k for k, v in flat.items() if k.startswith("masks/") and not np.all(v == 1)]
  if pruned:
    raise UserError(f"{pruned[0]} prunes channels; compact the model before exporting it "
                    "(picpq_jax.compress.compact)")
  layers = {l.name: l for l in model_structure(model, input_shape).layers}
  ctx = Context(flat, model.quantizer or FullPrecision(), layers)
  g = _Graph()
  x = g.op("Cast", ["images"], "to_float", to=onnx.TensorProto.FLOAT)
  x = g.op("Div", [x, g.const("255", np.float32(255))], "scale")
  x = g.op("Sub", [x, g.const("mean", np.asarray(mean, np.float32))], "center")
  x = g.op("Div", [x, g.const("std", np.asarray(std, np.float32))], "normalize")
  x = g.op("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])
  writer = next(w for cls, w in WRITERS if isinstance(model, cls))
  logits = g.op("Identity", [writer(g, ctx, model, x)], "logits")
  classes = layers["head"].out_features
  graph = onnx.helper.make_graph(
      g.nodes, name,
      [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.UINT8,
                                          ["N", *input_shape])],
      [onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["N", classes])],
      g.initializers)
  proto = onnx.helper.make_model(graph, producer_name="picpq_jax",
                                 opset_imports=[onnx.helper.make_opsetid("", OPSET)])
  proto.ir_version = 10  # onnxruntime >= 1.17 reads IR 10
  onnx.checker.check_model(proto, full_check=True)
  return proto


def write_file(path: str | os.PathLike, data: bytes) -> int:
  """Writes ``data`` to ``path`` through a temporary file and ``os.replace``; returns
  the size in bytes."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"cannot export to {path}: folder {folder} does not exist; create it")
  tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return os.path.getsize(path)


def export_onnx(path: str | os.PathLike, model: nn.Module, variables: Mapping[str, Any],
                mean, std, input_shape: tuple[int, int, int] = (32, 32, 3)) -> int:
  """Writes :func:`build_onnx`'s model to ``path``; returns the file's size in bytes."""
  proto = build_onnx(model, variables, mean, std, input_shape,
                     name=os.path.splitext(os.path.basename(os.fspath(path)))[0])
  return write_file(path, proto.SerializeToString())
