"""Cutting a model in two: a client part up to the cut and a server part after it.

Every model of the library is a sequence of pieces (its ``pieces()``: a stem, stages or
conv groups, a head) and runs a contiguous range of them when its static ``span``
field says so (:data:`picpq_jax.models.layers.Span`). The client is the model with
``span=(0, b)``, the server the same model with ``span=(b, len(pieces))``: the same
module code under the same submodule names, so each part's ``params``,
``batch_stats`` and ``quant`` are subtrees of the whole model's and
``split(variables)`` / ``merge(client, server)`` only regroup top-level keys. A
compacted model (``group_sizes``, ``shortcut_maps``) splits like a dense one.

``--cut k`` cuts after the piece numbered ``k``: ``stem`` is 0, ``stage{k}`` /
``group{k}`` is ``k``; the head is never a cut. Per architecture
(:func:`valid_cuts`):

=================  ======  ====================================================
architecture       cuts    the client runs
=================  ======  ====================================================
resnet8..resnet110 0..3    0: stem conv-BN-ReLU; k: the stem and stages 1..k
resnet18           0..4    0: stem conv-BN-ReLU and max-pool; k: also stages 1..k
vgg16              1..5    conv groups 1..k with their pools (group k ends at the
                           k-th max-pool; group 5, conv11-13, with the average pool)
mobilenetv2        0..7    0: stem; k: also inverted-residual stages 1..k
=================  ======  ====================================================

Smashed data per 32x32 image: ResNet-20 ``32x32x16`` at cut 0 and 1, ``16x16x32`` at
2, ``8x8x64`` at 3; VGG-16 ``16x16x64``, ``8x8x128``, ``4x4x256``, ``2x2x512``,
``1x1x512``; MobileNetV2 ``32x32x32`` at 0, then ``x16``, ``x24``, ``16x16x32``,
``8x8x64``, ``8x8x96``, ``4x4x160``, ``4x4x320``.

Masks are constants (never trained nor sent): both parts hold the whole model's
``masks``, so a group that spans the cut is masked the same on both sides. The
smashed data's channels belong to the group its last client layer writes
(:attr:`SplitModel.smashed_group`): only that group's kept channels need to cross.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.structure import ChannelGroup, ModelStructure, model_structure

COLLECTIONS = ("params", "batch_stats", "masks", "quant")
Keys = tuple[tuple[str, tuple[str, ...]], ...]


def _piece_cut(piece: str) -> int:
  """The ``--cut`` value after piece ``piece``: 0 for ``stem``, ``k`` for ``stage{k}``."""
  if piece == "stem":
    return 0
  match = re.fullmatch(r"[a-z]+(\d+)", piece)
  if not match:
    raise ValueError(f"piece {piece!r} is neither 'stem' nor a name ending in its number")
  return int(match.group(1))


def valid_cuts(model: nn.Module) -> dict[int, str]:
  """``{cut: piece}``: each valid ``--cut`` of ``model`` and the piece it cuts after.

  Static: reads only the module's fields (its ``pieces()``), no tracing.
  """
  if not hasattr(model, "pieces"):
    raise UserError(f"{type(model).__name__} declares no pieces(), so split training cannot "
                    f"cut it: use a model of picpq_jax.models")
  pieces = model.pieces()
  return {_piece_cut(p): p for p in pieces[:-1]}


def describe_cuts(model: nn.Module) -> str:
  """``"0 (after stem), 1 (after stage1), ..."``: the valid cuts, for messages and help."""
  return ", ".join(f"{k} (after {p})" for k, p in valid_cuts(model).items())


def check_cut(arch: str, model: nn.Module, cut: int) -> None:
  """UserError naming the architecture and its valid cuts unless ``cut`` is one."""
  if cut not in valid_cuts(model):
    raise UserError(f"--cut={cut} is not a cut point of {arch}: use {describe_cuts(model)}")


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model cut in two, and how its variables divide between the parts.

  Attributes:
    full: the whole model, whose variables the parts share.
    client: ``client.apply(vars, images, train) -> smashed [N, h, w, c]``.
    server: ``server.apply(vars, smashed, train) -> logits [N, K]``.
    cut: the cut point.
    client_keys, server_keys: ``((collection, (top-level names...)), ...)`` of each part.
    smashed_group: the channel group of the smashed data (``None``: not prunable).
  """

  full: nn.Module
  client: nn.Module
  server: nn.Module
  cut: int
  client_keys: Keys
  server_keys: Keys
  smashed_group: str | None = None

  def split(self, variables: dict) -> tuple[dict, dict]:
    """``(client_variables, server_variables)``: subtrees of the whole model's."""
    def take(keys):
      return {col: {k: variables[col][k] for k in names} for col, names in keys}
    return take(self.client_keys), take(self.server_keys)

  def merge(self, client_vars: dict, server_vars: dict) -> dict:
    """The whole model's variables; the masks (both parts hold them) come from the client."""
    return {col: {**server_vars.get(col, {}), **client_vars.get(col, {})} for col in COLLECTIONS}

  def client_layer(self, name: str) -> bool:
    """Whether the layer at path ``name`` (``"stage1_block0/conv1"``) is on the client."""
    return name.split("/")[0] in dict(self.client_keys)["params"]

  def client_structure(self, structure: ModelStructure) -> ModelStructure:
    """The client's part of the whole model's ``structure``: its layers, and the groups
    they write, with readers and writers restricted to the client (for the cost model)."""
    layers = tuple(l for l in structure.layers if self.client_layer(l.name))
    names = {l.name for l in layers}
    keep = lambda xs: tuple(x for x in xs if x in names)
    groups = tuple(ChannelGroup(g.name, g.size, keep(g.writers), keep(g.readers),
                                keep(g.depthwise))
                   for g in structure.groups if keep(g.writers))
    return ModelStructure(structure.input_shape, layers, groups)


def _init_shapes(module: nn.Module, x: jax.ShapeDtypeStruct) -> dict:
  """Abstract variables of ``module`` on input ``x`` (no FLOPs, no memory)."""
  return dict(jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x))


@functools.lru_cache(maxsize=16)
def _whole(full: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict, ModelStructure]:
  """Abstract variables and structure of the whole model (cached: every cut needs them)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return _init_shapes(full, x), model_structure(full, input_shape)


def _keys(shapes: dict, masks: tuple[str, ...]) -> Keys:
  """A part's top-level names per collection; every part holds all ``masks``."""
  return tuple((col, masks if col == "masks" else tuple(sorted(shapes.get(col, {}))))
               for col in COLLECTIONS)


def default_input_shape(model: nn.Module) -> tuple[int, int, int]:
  """One example's shape for ``model``: its registered architecture's (``(32, 32, 3)``
  for the CIFAR models, ``(224, 224, 3)`` for ResNet-18)."""
  for spec in models.MODELS.values():
    if getattr(spec.build, "func", spec.build) is type(model):
      return spec.input_shape
  return (32, 32, 3)


def split_model(arch: str | nn.Module, cut: int, num_classes: int | None = None,
                quantizer: Quantizer = FullPrecision(),
                input_shape: tuple[int, int, int] | None = None) -> SplitModel:
  """Cuts a model after piece ``cut`` (see the module docstring for each architecture).

  Checks by abstract evaluation (no FLOPs) that the two parts' variables tile the
  whole model's exactly, with the same shapes.

  Args:
    arch: a registered name (``resnet20``, ``vgg16``, ``mobilenetv2``, ``resnet18``,
      ...) or a model module (e.g. a compacted one); then ``num_classes`` and
      ``quantizer`` are the module's own.
    cut: a valid cut of the architecture (:func:`valid_cuts`).
    num_classes: classes of the head (default: the architecture's).
    quantizer: the static quantizer of every layer.
    input_shape: one example, ``(H, W, C)`` (default: the architecture's).

  Raises:
    UserError: ``cut`` is not a cut point of the architecture (the message lists them).
  """
  full = arch if isinstance(arch, nn.Module) else models.get_model(
      arch, num_classes=num_classes, quantizer=quantizer)
  name = arch if isinstance(arch, str) else type(full).__name__
  check_cut(name, full, cut)
  pieces = full.pieces()
  boundary = list(valid_cuts(full)).index(cut) + 1
  input_shape = tuple(input_shape or default_input_shape(full))
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  whole, structure = _whole(full, input_shape)
  client = full.clone(parent=None, span=(0, boundary))
  server = full.clone(parent=None, span=(boundary, len(pieces)))
  cshapes = _init_shapes(client, x)
  h = jax.eval_shape(functools.partial(client.apply, train=False), cshapes, x)
  sshapes = _init_shapes(server, h)
  overlap = set(cshapes["params"]) & set(sshapes["params"])
  merged = {col: {**sshapes.get(col, {}), **cshapes.get(col, {})} for col in COLLECTIONS}
  merged["masks"] = whole.get("masks", {})
  if overlap or jax.tree.map(lambda a: a.shape, merged) != jax.tree.map(
      lambda a: a.shape, {col: whole.get(col, {}) for col in COLLECTIONS}):
    raise ValueError(f"the client and server parts of {name} at cut {cut} do not tile the "
                     f"model (shared: {sorted(overlap)}): its span handling is out of date")
  masks = tuple(sorted(whole.get("masks", {})))
  split = SplitModel(full, client, server, cut, _keys(cshapes, masks), _keys(sshapes, masks))
  last = [l for l in structure.layers if split.client_layer(l.name)][-1]
  group = last.out_group
  if group is not None and structure.group(group).size != h.shape[-1]:
    group = None  # the smashed channels are not one group's (not the case in the library)
  return dataclasses.replace(split, smashed_group=group)
