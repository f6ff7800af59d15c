"""CsiNet (Wen et al. 2018) and CRNet (Lu et al. 2020) as split encoder/decoder pairs.

A sample is NHWC ``[32, 32, 2]`` in [0, 1] (see :mod:`picpq_jax.csi.domain`); the
encoder maps ``[N, 32, 32, 2] -> [N, M]`` codewords with ``M = 2048 / CR`` and the
decoder maps them back to ``[N, 32, 32, 2]`` through a sigmoid. Encoder and decoder
are separate Flax modules (the UE holds one, the BTS the other);
:class:`CsiAutoencoder` composes them as submodules ``encoder`` and ``decoder``, so
``variables[col]["encoder"]`` are exactly the encoder's variables.

Layers are the library's :class:`~picpq_jax.models.layers.QConv` /
:class:`~picpq_jax.models.layers.QDense` (so the UE side can be quantized by data)
with batch norm after every conv and LeakyReLU(0.3), as both papers. Where the
references differ from here: CsiNet's convolutions carry a bias (Keras'
default; CRNet's ``ConvBN`` has none, as here); the flatten before the encoder's
dense layer and the reshape after the decoder's run in NHWC order ``(H, W, C)``, a
fixed permutation of the references' channels-first order (pretrained reference
weights would need their dense rows/columns permuted); kernels use the library's
initializers, not Keras' Glorot or CRNet's Xavier.

Decoder stages. Every decoder is a sequence of :meth:`pieces` (``fc``, then
blocks, the sigmoid inside the last one) and takes a static ``span`` field as the
library's models do (:data:`~picpq_jax.models.layers.Span`): ``span=(a, b)`` runs
pieces ``a <= i < b`` and creates only their variables. :func:`decoder_stages`
cuts a decoder into ``S`` consecutive spans of balanced cost (counted MACs), so a
pipelined BTS runs stage ``s`` as ``decoder.clone(span=spans[s])`` on :func:`stage_variables` of the decoder's. Piece 0 maps ``[N, M] -> [N, 32, 32, 2]``;
every later piece maps ``[N, 32, 32, 2] -> [N, 32, 32, 2]``, so all inter-stage
activations after the first have one shape.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import chex
import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.csi.domain import ANTENNAS, CODE_SIZE, DELAY_ROWS
from picpq_jax.errors import UserError
from picpq_jax.models.layers import QConv, QDense, Span, batch_norm, in_span
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.structure import model_structure

Array = jax.Array
SAMPLE_SHAPE = (ANTENNAS, DELAY_ROWS, 2)
COMPRESSION_RATIOS = (4, 8, 16, 32, 64)  # the ones the literature reports
OUTPUT_INIT_SCALE = 0.01  # CsiNet's output kernel at init (init_csi_variables)
# CRNet's quiet start (init_csi_variables): the head's BN scale x0.1 and shift +0.3 (the
# residual stream starts quiet and in LeakyReLU's linear part), each CRBlock's last BN
# scale 0 (zero-init residual), crblock2's last BN shift -0.3 (the sigmoid's input
# centred again). Chosen on seed-0 data (experiments/csi/crnet_init.py).
CRNET_HEAD_SCALE, CRNET_STREAM_SHIFT = 0.1, 0.3


def leaky(x: Array) -> Array:
  """LeakyReLU with slope 0.3 (both papers)."""
  return nn.leaky_relu(x, 0.3)


def codeword_size(cr: int) -> int:
  """``M = 2048 / cr``; a one-line UserError when ``cr`` does not divide 2048."""
  if not isinstance(cr, int) or cr < 1 or CODE_SIZE % cr:
    raise UserError(f"compression ratio {cr!r} must be a positive integer dividing "
                    f"{CODE_SIZE}, e.g. one of {', '.join(map(str, COMPRESSION_RATIOS))}")
  return CODE_SIZE // cr


class ConvBN(nn.Module):
  """``QConv`` (padding ``k // 2``) then batch norm: ``[N, H, W, C] -> [N, H, W, features]``."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = False
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = QConv(self.features, self.kernel_size, use_bias=self.use_bias,
              quantizer=self.quantizer, dtype=self.dtype, name="conv")(x)
    return batch_norm(train, "bn")(x)


def expand_codeword(x: Array, quantizer: Quantizer, dtype: str) -> Array:
  """A decoder's first piece: Dense ``[N, M] -> [N, 2048]`` (named ``fc``), reshaped to
  ``[N, 32, 32, 2]``. Call it inside a decoder's compact ``__call__``."""
  chex.assert_rank(x, 2)
  x = QDense(CODE_SIZE, quantizer=quantizer, dtype=dtype, name="fc")(x)
  return x.reshape(x.shape[0], *SAMPLE_SHAPE)


# --------------------------------------------------------------------------- CsiNet


class CsiNetEncoder(nn.Module):
  """CsiNet encoder ``[N, 32, 32, 2] -> [N, codeword]``: Conv3x3(2->2)+BN+LeakyReLU,
  flatten 2048, Dense (linear)."""

  codeword: int
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    chex.assert_shape(x, (None, *SAMPLE_SHAPE))
    x = leaky(ConvBN(2, use_bias=True, quantizer=self.quantizer, dtype=self.dtype,
                     name="conv")(x, train))
    return QDense(self.codeword, quantizer=self.quantizer, dtype=self.dtype,
                  name="fc")(x.reshape(x.shape[0], CODE_SIZE))


class RefineNet(nn.Module):
  """CsiNet's RefineNet block, ``[N, 32, 32, 2] -> [N, 32, 32, 2]``: Conv3x3 to 8, 16
  and 2 channels, each with BN, LeakyReLU after the first two; add the input; LeakyReLU."""

  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    y = x
    for i, features in enumerate((8, 16, 2)):
      y = ConvBN(features, use_bias=True, quantizer=self.quantizer, dtype=self.dtype,
                 name=f"conv{i + 1}")(y, train)
      y = leaky(y) if i < 2 else y
    return leaky(y + x)


class CsiNetDecoder(nn.Module):
  """CsiNet decoder ``[N, codeword] -> [N, 32, 32, 2]`` in (0, 1).

  Pieces: ``fc`` (Dense to 2048, reshape), ``refine1``, ``refine2`` (:class:`RefineNet`),
  ``out`` (Conv3x3(2->2) with bias, sigmoid). ``span``: see the module docstring.
  """

  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  span: Span = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if in_span(self.span, 0):
      x = expand_codeword(x, self.quantizer, self.dtype)
    for i in (1, 2):
      if in_span(self.span, i):
        x = RefineNet(self.quantizer, self.dtype, name=f"refine{i}")(x, train)
    if in_span(self.span, 3):
      x = QConv(2, use_bias=True, quantizer=self.quantizer, dtype=self.dtype, name="out")(x)
      x = nn.sigmoid(x)
    return x

  def pieces(self) -> tuple[str, ...]:
    """The decoder's pieces in order (the units a pipeline stage holds)."""
    return ("fc", "refine1", "refine2", "out")

  def quiet_start(self) -> tuple[tuple[tuple[str, ...], float, float], ...]:
    """``(path in params, multiply, add)`` of the quiet start (:func:`init_csi_variables`):
    the output conv's kernel at :data:`OUTPUT_INIT_SCALE` of its draw."""
    return ((("out", "kernel"), OUTPUT_INIT_SCALE, 0.0),)


# --------------------------------------------------------------------------- CRNet


class CRNetEncoder(nn.Module):
  """CRNet's multi-resolution encoder ``[N, 32, 32, 2] -> [N, codeword]``.

  Path 1: ConvBN 3x3, LeakyReLU, ConvBN 1x9, LeakyReLU, ConvBN 9x1 (2 channels
  each); path 2: ConvBN 3x3 (2 channels); concatenate (4), LeakyReLU, ConvBN 1x1 to
  2, LeakyReLU, flatten, Dense (linear).
  """

  codeword: int
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    chex.assert_shape(x, (None, *SAMPLE_SHAPE))
    conv = lambda f, k, name: ConvBN(f, k, quantizer=self.quantizer, dtype=self.dtype, name=name)
    a = leaky(conv(2, (3, 3), "path1_conv3x3")(x, train))
    a = leaky(conv(2, (1, 9), "path1_conv1x9")(a, train))
    a = conv(2, (9, 1), "path1_conv9x1")(a, train)
    b = conv(2, (3, 3), "path2_conv3x3")(x, train)
    y = leaky(jnp.concatenate([a, b], axis=-1))
    y = leaky(conv(2, (1, 1), "merge_conv1x1")(y, train))
    return QDense(self.codeword, quantizer=self.quantizer, dtype=self.dtype,
                  name="fc")(y.reshape(y.shape[0], CODE_SIZE))


class CRBlock(nn.Module):
  """CRNet's CRBlock ``[N, 32, 32, 2] -> [N, 32, 32, 2]``.

  Path 1: ConvBN 3x3 to 7, LeakyReLU, ConvBN 1x9, LeakyReLU, ConvBN 9x1; path 2:
  ConvBN 1x5 to 7, LeakyReLU, ConvBN 5x1; concatenate (14), LeakyReLU, ConvBN 1x1
  to 2; add the input; LeakyReLU.
  """

  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = lambda f, k, name: ConvBN(f, k, quantizer=self.quantizer, dtype=self.dtype, name=name)
    a = leaky(conv(7, (3, 3), "path1_conv3x3")(x, train))
    a = leaky(conv(7, (1, 9), "path1_conv1x9")(a, train))
    a = conv(7, (9, 1), "path1_conv9x1")(a, train)
    b = leaky(conv(7, (1, 5), "path2_conv1x5")(x, train))
    b = conv(7, (5, 1), "path2_conv5x1")(b, train)
    y = leaky(jnp.concatenate([a, b], axis=-1))
    y = conv(2, (1, 1), "merge_conv1x1")(y, train)
    return leaky(y + x)


class CRNetDecoder(nn.Module):
  """CRNet decoder ``[N, codeword] -> [N, 32, 32, 2]`` in (0, 1).

  Pieces: ``fc`` (Dense to 2048, reshape), ``head`` (ConvBN 5x5, LeakyReLU),
  ``crblock1``, ``crblock2`` (:class:`CRBlock`; the sigmoid follows the last).
  """

  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  span: Span = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if in_span(self.span, 0):
      x = expand_codeword(x, self.quantizer, self.dtype)
    if in_span(self.span, 1):
      x = leaky(ConvBN(2, (5, 5), quantizer=self.quantizer, dtype=self.dtype,
                       name="head")(x, train))
    for i in (1, 2):
      if in_span(self.span, i + 1):
        x = CRBlock(self.quantizer, self.dtype, name=f"crblock{i}")(x, train)
    if in_span(self.span, 3):
      x = nn.sigmoid(x)
    return x

  def pieces(self) -> tuple[str, ...]:
    """The decoder's pieces in order (the units a pipeline stage holds)."""
    return ("fc", "head", "crblock1", "crblock2")

  def quiet_start(self) -> tuple[tuple[tuple[str, ...], float, float], ...]:
    """``(path in params, multiply, add)`` of the quiet start (:func:`init_csi_variables`).

    The sigmoid follows the residual stream ``leaky(... + leaky(head))`` with no layer
    of its own, so the stream itself starts quiet: the head's BN scale times
    :data:`CRNET_HEAD_SCALE`, its shift ``+CRNET_STREAM_SHIFT`` (the stream in
    LeakyReLU's linear part), each CRBlock's merge BN scale 0 (zero-init residual:
    the blocks start as identities) and crblock2's merge BN shift
    ``-CRNET_STREAM_SHIFT`` (the sigmoid's input centred at 0 again).
    """
    merge = lambda i, leaf: (f"crblock{i}", "merge_conv1x1", "bn", leaf)
    return ((("head", "bn", "scale"), CRNET_HEAD_SCALE, 0.0),
            (("head", "bn", "bias"), 1.0, CRNET_STREAM_SHIFT),
            (merge(1, "scale"), 0.0, 0.0), (merge(2, "scale"), 0.0, 0.0),
            (merge(2, "bias"), 1.0, -CRNET_STREAM_SHIFT))


# --------------------------------------------------------------------------- composed


class CsiAutoencoder(nn.Module):
  """``encoder`` then ``decoder``: ``[N, 32, 32, 2] -> [N, 32, 32, 2]``."""

  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, x: Array, train: bool = False) -> Array:
    return self.decoder(self.encoder(x, train), train)

  def encode(self, x: Array, train: bool = False) -> Array:
    """The codewords ``[N, M]`` (what the UE uploads)."""
    return self.encoder(x, train)


ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "csinet": (CsiNetEncoder, CsiNetDecoder),
    "crnet": (CRNetEncoder, CRNetDecoder),
}


def get_csi_model(arch: str, cr: int, quantizer: Quantizer = FullPrecision(),
                  dtype: str = "float32") -> CsiAutoencoder:
  """The named autoencoder at compression ratio ``cr`` (codeword ``M = 2048 / cr``).

  Raises:
    UserError: unknown ``arch`` or a ``cr`` that does not divide 2048.
  """
  if arch not in ARCHITECTURES:
    raise UserError(f"unknown CSI architecture {arch!r}: choose one of "
                    f"{', '.join(sorted(ARCHITECTURES))}")
  encoder, decoder = ARCHITECTURES[arch]
  return CsiAutoencoder(encoder(codeword_size(cr), quantizer, dtype),
                        decoder(quantizer, dtype))


def piece_macs(decoder: nn.Module, codeword: int) -> tuple[int, ...]:
  """Multiply-accumulates per sample of each of ``decoder.pieces()``, from the library's
  cost model (:func:`~picpq_jax.models.structure.model_structure`: every conv and
  dense layer, summed by the piece its variables sit under); ``codeword``: ``M``."""
  per_piece = dict.fromkeys(decoder.pieces(), 0)
  for layer in model_structure(decoder.clone(span=None), (codeword,)).layers:
    per_piece[layer.name.split("/")[0]] += layer.macs
  return tuple(per_piece.values())


def decoder_stages(decoder: nn.Module, num_stages: int, codeword: int,
                   costs: Sequence[float] | None = None) -> tuple[tuple[int, int], ...]:
  """Cuts a decoder's pieces into ``num_stages`` consecutive spans of balanced cost.

  Of all cuts into ``num_stages`` non-empty spans, the one whose costliest stage costs
  least (the pipeline's pace: GPipe ticks at its slowest stage); ties go to the first
  cut in lexicographic order. ``costs``: one number per piece, e.g. measured seconds;
  default :func:`piece_macs` at codeword size ``codeword``. E.g. CRNet at CR 4
  (MACs fc 1,048,576, head 102,400, crblocks 1,383,424 each) in 2 stages ->
  ``((0, 3), (3, 4))``. Static: call it on an unbound decoder. Raises a UserError for
  fewer than 1 or more stages than pieces.
  """
  n = len(decoder.pieces())
  if not 1 <= num_stages <= n:
    raise UserError(f"{num_stages} pipeline stages for a decoder of {n} pieces "
                    f"({', '.join(decoder.pieces())}): use 1 to {n} stages")
  costs = piece_macs(decoder, codeword) if costs is None else tuple(costs)
  cuts = (((0, *c), (*c, n)) for c in itertools.combinations(range(1, n), num_stages - 1))
  best = min(cuts, key=lambda ab: max(sum(costs[a:b]) for a, b in zip(*ab)))
  return tuple(zip(*best))


def stage_variables(variables: dict, decoder: nn.Module,
                    span: tuple[int, int]) -> dict:
  """The part of a whole decoder's ``variables`` that ``decoder.clone(span=span)`` uses.

  Each piece's variables sit under the piece's name (``fc``, ``refine1``, ...), so a
  stage's are those of its pieces, collection by collection (collections the stage
  does not use are dropped). The stages' parts of :func:`decoder_stages` partition
  the decoder's variables: merging them back is a dict union per collection.
  """
  names = set(decoder.pieces()[span[0]:span[1]])
  picked = {col: {k: v for k, v in tree.items() if k in names} for col, tree in variables.items()}
  return {col: tree for col, tree in picked.items() if tree}


def init_csi_variables(model: nn.Module, key: jax.Array, batch: int = 1,
                       quiet: bool = True) -> dict:
  """Initial ``{"params", "batch_stats", "quant"}`` of an autoencoder or encoder
  (input ``[batch, 32, 32, 2]``).

  ``quiet``: the decoder's :meth:`quiet_start` adjusts the draw so the untrained
  autoencoder outputs about 0.5 (zero CSI, 0 dB NMSE) instead of a sigmoid of
  unit-scale features (+18 dB CsiNet, +16 dB CRNet): the CSI deviates from 0.5 by
  about 0.03 (std), and from the default start short runs went into shrinking the
  output (measured, Adam 3e-3, 1000 steps: CsiNet -1.02 dB as drawn, -4.62 dB quiet;
  CRNet as drawn collapses to 0 dB, the output constant;
  ``experiments/csi/plateau.py``, ``crnet_init.py``). False: the default draw.
  """
  x = jnp.zeros((batch, *SAMPLE_SHAPE), jnp.float32)
  variables = dict(jax.jit(lambda k: model.init(k, x, train=False))(key))
  decoder = getattr(model, "decoder", None)
  if quiet and decoder is not None:
    params = flax.core.unfreeze(variables["params"])
    for path, multiply, add in decoder.quiet_start():
      *parents, leaf = ("decoder", *path)
      node = functools.reduce(lambda d, k: d[k], parents, params)
      node[leaf] = node[leaf] * multiply + add
    variables["params"] = params
  return variables


def layer_macs(model: nn.Module, variables: dict, x: Array) -> int:
  """Multiply-accumulates per sample of every conv and dense layer (what ``thop``
  reports as "FLOPs" for CRNet): output positions times kernel size, summed.

  ``x``: an input batch ``[N, ...]`` (or its ``jax.ShapeDtypeStruct``); traced for
  shapes only.
  """
  total = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, (QConv, QDense)) and context.method_name == "__call__":
      kernel = module.variables["params"]["kernel"]
      positions = out.size // out.shape[-1] // out.shape[0]
      total.append(positions * kernel.size)
    return out

  def run(v, inputs):
    with nn.intercept_methods(count):
      return model.apply(v, inputs, train=False)

  jax.eval_shape(run, variables, x)  # shapes only: nothing is computed
  return int(sum(total))
