"""Cutting a model in two: a client part up to the cut and a server part after it.

For the CIFAR ResNets the two parts are small Flax modules that reuse the model's own
block classes (:class:`~picpq_jax.models.resnet_cifar.BasicBlock`, ``QConv``,
``batch_norm``, ``channel_mask``) under the *same* submodule and variable names, so
the client's and the server's variables are subtrees of the whole model's:
``split(variables)`` and ``merge(client, server)`` only regroup top-level keys.

Cut points (``cut``): ``0`` after the stem (conv-BN-ReLU), ``k`` in ``1..3`` after the
last block of stage ``k``. Masks are data that both sides need where a channel group
spans the cut (``stage1`` at cut 0): each side holds a copy, and the merge keeps the
client's. Other architectures raise a :class:`~picpq_jax.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.models.layers import QConv, QDense, batch_norm, channel_mask
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.resnet_cifar import BasicBlock, CifarResNet

Array = jax.Array
COLLECTIONS = ("params", "batch_stats", "masks", "quant")
RESNET_CUTS = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class ResNetWiring:
  """The static widths and shortcuts of a CIFAR ResNet, read off the whole model.

  Taken from the model's variables (mask sizes) and its ``shortcut_maps`` field, so a
  compacted model (narrower groups, index shortcuts) splits like a dense one.
  """

  blocks: int  # basic blocks per stage
  stream: tuple[int, ...]  # channels of each stage's residual stream
  mid: tuple[tuple[int, ...], ...]  # [stage][block] inner channels
  shortcut_maps: tuple[tuple[int, ...], ...] | None  # None: option A zero-padding


def _stream_masks(module: nn.Module, wiring: ResNetWiring, stages: range) -> dict[int, Array]:
  """The residual-stream mask of each stage in ``stages``: ``{s: float32 [stream[s]]}``."""
  return {s: channel_mask(module, f"stage{s + 1}", wiring.stream[s]) for s in stages}


def _run_stages(module: nn.Module, x: Array, stages: range, streams: dict[int, Array],
                wiring: ResNetWiring, quantizer: Quantizer, train: bool) -> Array:
  """Runs the basic blocks of ``stages`` exactly as :class:`CifarResNet` names and wires them."""
  for s in stages:
    for b in range(wiring.blocks):
      name = f"stage{s + 1}_block{b}"
      first = s > 0 and b == 0
      x = BasicBlock(
          wiring.stream[s], stride=2 if first else 1,
          in_group=f"stage{s}" if first else f"stage{s + 1}", mid_group=f"{name}_mid",
          out_group=f"stage{s + 1}", quantizer=quantizer, mid_features=wiring.mid[s][b],
          shortcut_index=wiring.shortcut_maps[s - 1] if (first and wiring.shortcut_maps) else None,
          name=name)(x, channel_mask(module, f"{name}_mid", wiring.mid[s][b]), streams[s], train)
  return x


class ResNetClient(nn.Module):
  """Front of a CIFAR ResNet: stem and stages ``1..cut``.

  ``[N, 32, 32, 3] -> [N, h, w, c]`` smashed data (``32x32x16`` at cut 0 and 1,
  ``16x16x32`` at cut 2, ``8x8x64`` at cut 3 for the standard widths), post-ReLU and
  masked.
  """

  wiring: ResNetWiring
  cut: int
  quantizer: Quantizer = FullPrecision()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    streams = _stream_masks(self, self.wiring, range(max(self.cut, 1)))
    x = QConv(self.wiring.stream[0], out_group="stage1", quantizer=self.quantizer,
              name="stem_conv")(x)
    x = nn.relu(batch_norm(train, "stem_bn")(x)) * streams[0]
    return _run_stages(self, x, range(self.cut), streams, self.wiring, self.quantizer, train)


class ResNetServer(nn.Module):
  """Back of a CIFAR ResNet: stages ``cut+1..3``, global average pool and the head.

  ``[N, h, w, c]`` smashed data -> ``[N, num_classes]`` logits.
  """

  wiring: ResNetWiring
  cut: int
  num_classes: int = 10
  quantizer: Quantizer = FullPrecision()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    stages = range(self.cut, len(self.wiring.stream))
    streams = _stream_masks(self, self.wiring, stages)
    x = _run_stages(self, x, stages, streams, self.wiring, self.quantizer, train)
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, in_group=f"stage{len(self.wiring.stream)}",
                  quantizer=self.quantizer, name="head")(x)


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model cut in two, and how its variables divide between the parts.

  Attributes:
    full: the whole model, whose variables the parts share.
    client: ``client.apply(vars, images, train) -> smashed [N, h, w, c]``.
    server: ``server.apply(vars, smashed, train) -> logits [N, K]``.
    cut: the cut point.
    client_keys, server_keys: ``((collection, (top-level names...)), ...)`` of each part.
  """

  full: nn.Module
  client: nn.Module
  server: nn.Module
  cut: int
  client_keys: tuple[tuple[str, tuple[str, ...]], ...]
  server_keys: tuple[tuple[str, tuple[str, ...]], ...]

  def split(self, variables: dict) -> tuple[dict, dict]:
    """``(client_variables, server_variables)``: subtrees of the whole model's."""
    def take(keys):
      return {col: {k: variables[col][k] for k in names} for col, names in keys}
    return take(self.client_keys), take(self.server_keys)

  def merge(self, client_vars: dict, server_vars: dict) -> dict:
    """The whole model's variables; a mask both parts hold comes from the client."""
    return {col: {**server_vars.get(col, {}), **client_vars.get(col, {})} for col in COLLECTIONS}


def _init_shapes(module: nn.Module, x: jax.ShapeDtypeStruct) -> dict:
  """Abstract variables of ``module`` on input ``x`` (no FLOPs, no memory)."""
  return dict(jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x))


def _keys(shapes: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
  return tuple((col, tuple(sorted(shapes.get(col, {})))) for col in COLLECTIONS)


def resnet_wiring(full: CifarResNet, shapes: dict) -> ResNetWiring:
  """The :class:`ResNetWiring` of ``full`` given its abstract variables ``shapes``."""
  masks = shapes["masks"]
  blocks = (full.depth - 2) // 6
  stages = len(full.widths)
  maps = full.shortcut_maps
  if maps is not None:
    maps = tuple(c.index for c in full.shortcut_couplings())
  return ResNetWiring(
      blocks=blocks, stream=tuple(masks[f"stage{s + 1}"].shape[0] for s in range(stages)),
      mid=tuple(tuple(masks[f"stage{s + 1}_block{b}_mid"].shape[0] for b in range(blocks))
                for s in range(stages)),
      shortcut_maps=maps)


def split_model(arch: str | nn.Module, cut: int, num_classes: int | None = None,
                quantizer: Quantizer = FullPrecision()) -> SplitModel:
  """Cuts a model after ``cut`` (see the module docstring).

  Checks by abstract evaluation (no FLOPs) that the two parts' variables tile the
  whole model's exactly, with the same shapes.

  Args:
    arch: a CIFAR ResNet name (``resnet8``, ``resnet20``, ``resnet32``, ...) or a
      :class:`CifarResNet` module (e.g. a compacted one); then ``num_classes`` and
      ``quantizer`` are the module's own.
    cut: ``0`` (after the stem) or ``1..3`` (after that stage).
    num_classes: classes of the head (default: the architecture's).
    quantizer: the static quantizer of every layer.
  """
  full = arch if isinstance(arch, nn.Module) else models.get_model(
      arch, num_classes=num_classes, quantizer=quantizer)
  if not isinstance(full, CifarResNet):
    supported = sorted(n for n, s in models.MODELS.items()
                       if getattr(s.build, "func", None) is CifarResNet)
    raise UserError(f"split training cuts CIFAR ResNets only, not {arch!r}: use one of "
                    f"{', '.join(supported)}")
  if cut not in RESNET_CUTS:
    raise UserError(f"--cut={cut} is out of range for a CIFAR ResNet: use 0 (after the "
                    f"stem) or 1..3 (after that stage)")
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  whole = _init_shapes(full, x)
  wiring = resnet_wiring(full, whole)
  client = ResNetClient(wiring, cut, full.quantizer)
  server = ResNetServer(wiring, cut, full.num_classes, full.quantizer)
  cshapes = _init_shapes(client, x)
  h = jax.eval_shape(functools.partial(client.apply, train=False), cshapes, x)
  sshapes = _init_shapes(server, h)
  merged = {col: {**sshapes.get(col, {}), **cshapes.get(col, {})} for col in COLLECTIONS}
  if jax.tree.map(lambda a: a.shape, merged) != jax.tree.map(lambda a: a.shape, whole):
    raise ValueError(f"the client and server parts of {type(full).__name__} no longer tile "
                     f"the model: update picpq_jax/federated/split.py to match it")
  return SplitModel(full, client, server, cut, _keys(cshapes), _keys(sshapes))
