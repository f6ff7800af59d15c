"""PyTorch twins of the library's CIFAR ResNets and VGG-16-BN, for the benchmarks.

Same architectures as :mod:`picpq_jax.models` (NCHW here, NHWC there):

* :class:`TorchCifarResNet`: ResNet-(6n+2), widths 16/32/64, option-A shortcuts
  (subsample by 2, zero-pad channels evenly), optional per-group widths and
  shortcut index maps, so a physically pruned model can be built the way the
  reference code builds one.
* :class:`TorchVGG`: VGG-16-BN for CIFAR with conv biases, 2x2 max-pools, a final
  2x2 average pool and ``Linear(512, 512) -> BN1d -> ReLU -> Linear``.

Module names mirror the Flax paths (``stage1_block0.conv1`` is
``stage1_block0/conv1``), so :func:`load_flax_variables` copies a Flax model's
variables into its twin and the logits agree (checked in
``tests/bench/test_bench_quick.py``). :func:`prune_resnet` is the reference's way
to evaluate a pruned candidate: deep-copy the full model, then build a smaller
one and copy the kept channels' weights into it.

Imported only by the benchmarks (PyTorch is the optional ``torch`` extra).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

from picpq_jax.compress.criteria import bn_name
from picpq_jax.models.resnet_cifar import option_a_index
from picpq_jax.models.structure import ModelStructure

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _bn2d(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut, then ReLU (NCHW)."""

  def __init__(self, in_ch: int, mid: int, out: int, stride: int,
               shortcut_index: Sequence[int] | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
    self.bn1 = _bn2d(mid)
    self.conv2 = nn.Conv2d(mid, out, 3, 1, 1, bias=False)
    self.bn2 = _bn2d(out)
    self.stride, self.in_ch, self.out = stride, in_ch, out
    if shortcut_index is None and out < in_ch:
      raise ValueError(f"an option-A shortcut cannot narrow {in_ch} channels to {out}")
    if shortcut_index is not None:
      idx = torch.as_tensor(np.asarray(shortcut_index, np.int64))
      self.register_buffer("sc_take", idx.clamp(min=0), persistent=False)
      self.register_buffer("sc_keep", (idx >= 0).float().view(1, -1, 1, 1), persistent=False)
    else:
      self.sc_take = None

  def shortcut(self, x: torch.Tensor) -> torch.Tensor:
    if self.stride != 1:
      x = x[:, :, ::self.stride, ::self.stride]
    if self.sc_take is not None:
      return x.index_select(1, self.sc_take) * self.sc_keep
    pad = self.out - x.shape[1]
    if pad:
      x = F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))
    return x

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class TorchCifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 images; ``[N, 3, 32, 32] -> [N, num_classes]``.

  Args:
    depth: 6n+2.
    num_classes: classes of the head.
    widths: the three stage streams' channels.
    group_sizes: width overrides ``{group: channels}`` with the Flax model's group
      names (``stage{s}``, ``stage{s}_block{b}_mid``).
    shortcut_maps: index map of each stage's first shortcut (see
      ``picpq_jax.models.resnet_cifar.index_shortcut``); ``None``: zero-pad evenly.
  """

  def __init__(self, depth: int = 56, num_classes: int = 10,
               widths: Sequence[int] = (16, 32, 64),
               group_sizes: Mapping[str, int] | None = None,
               shortcut_maps: Sequence[Sequence[int]] | None = None):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    sizes = dict(group_sizes or {})
    blocks = (depth - 2) // 6
    streams = [sizes.get(f"stage{s + 1}", w) for s, w in enumerate(widths)]
    self.stem_conv = nn.Conv2d(3, streams[0], 3, 1, 1, bias=False)
    self.stem_bn = _bn2d(streams[0])
    self.block_names = []
    in_ch = streams[0]
    for s, width in enumerate(streams):
      for b in range(blocks):
        name = f"stage{s + 1}_block{b}"
        first = s > 0 and b == 0
        index = shortcut_maps[s - 1] if (shortcut_maps is not None and first) else None
        self.add_module(name, BasicBlock(in_ch, sizes.get(f"{name}_mid", widths[s]), width,
                                         2 if first else 1, index))
        self.block_names.append(name)
        in_ch = width
    self.head = nn.Linear(in_ch, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.head(x.mean(dim=(2, 3)))


class _ConvBNReLU(nn.Module):
  def __init__(self, in_ch: int, out: int):
    super().__init__()
    self.conv = nn.Conv2d(in_ch, out, 3, 1, 1, bias=True)
    self.bn = _bn2d(out)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class TorchVGG(nn.Module):
  """VGG-16-BN for 32x32 images; ``[N, 3, 32, 32] -> [N, num_classes]``."""

  def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, hidden: int = 512,
               num_classes: int = 10):
    super().__init__()
    self.plan = []
    in_ch, i = 3, 0
    for v in cfg:
      if v == "M":
        self.plan.append("M")
        continue
      i += 1
      self.add_module(f"layer{i}", _ConvBNReLU(in_ch, v))
      self.plan.append(f"layer{i}")
      in_ch = v
    self.linear1 = nn.Linear(in_ch, hidden)
    self.norm1 = nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x):
    for step in self.plan:
      x = F.max_pool2d(x, 2, 2) if step == "M" else getattr(self, step)(x)
    x = F.avg_pool2d(x, 2, 2).flatten(1)
    return self.head(F.relu(self.norm1(self.linear1(x))))


def has_twin(arch: str) -> bool:
  """Whether :func:`build` has a twin of the registry name ``arch``."""
  depth = arch[len("resnet"):]
  return arch == "vgg16" or (arch.startswith("resnet") and depth.isdigit()
                             and int(depth) % 6 == 2)


def build(arch: str, num_classes: int = 10) -> nn.Module:
  """The twin of the library's registry name ``arch`` (``resnet{6n+2}`` or ``vgg16``)."""
  if not has_twin(arch):
    raise ValueError(f"no PyTorch twin for {arch!r}: use resnet{{6n+2}} or vgg16")
  if arch == "vgg16":
    return TorchVGG(num_classes=num_classes)
  return TorchCifarResNet(int(arch[len("resnet"):]), num_classes)


_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def load_flax_variables(module: nn.Module, variables: Mapping[str, Any]) -> nn.Module:
  """Copies a Flax model's ``params`` and ``batch_stats`` into its twin, in place.

  Conv kernels HWIO -> OIHW, dense ``[in, out]`` -> ``[out, in]``, BN
  ``scale/bias/mean/var`` -> ``weight/bias/running_mean/running_var``. Every
  tensor of the twin's state dict must be written exactly once.
  """
  state = {}
  for collection in ("params", "batch_stats"):
    for path, value in traverse_util.flatten_dict(dict(variables[collection])).items():
      value = np.array(value, np.float32)  # a writable copy
      if path[-1] == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        leaf = "weight"
      else:
        leaf = _LEAF[path[-1]]
      state[".".join([*path[:-1], leaf])] = torch.from_numpy(np.ascontiguousarray(value))
  own = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
  if set(state) != own:
    raise ValueError(f"variables do not fit the PyTorch twin: "
                     f"{sorted(set(state) ^ own)[:4]}")
  module.load_state_dict(state, strict=False)
  return module


def _compose(index: Sequence[int], source_kept: np.ndarray, target_kept: np.ndarray) -> list[int]:
  position = {int(c): p for p, c in enumerate(source_kept)}
  return [position.get(index[int(t)], -1) for t in target_kept]


def prune_resnet(model: TorchCifarResNet, structure: ModelStructure,
                 kept: Mapping[str, np.ndarray]) -> TorchCifarResNet:
  """The reference's physical pruning: a deep copy of ``model`` sliced to ``kept``.

  Args:
    model: the full PyTorch ResNet (not modified).
    structure: the Flax twin's ``model_structure`` (which group each conv reads and
      writes; names mirror the PyTorch modules).
    kept: ``{group: int array}`` of kept channel indices (ascending).

  Returns:
    A new, smaller :class:`TorchCifarResNet` whose logits equal the masked model's.
  """
  full = copy.deepcopy(model)
  blocks = len(full.block_names) // 3
  widths = [full.stem_conv.out_channels, full.stage2_block0.conv2.out_channels,
            full.stage3_block0.conv2.out_channels]
  maps = [_compose(option_a_index(widths[s], widths[s + 1]), kept[f"stage{s + 1}"],
                   kept[f"stage{s + 2}"]) for s in range(2)]
  small = TorchCifarResNet(3 * 2 * blocks + 2, full.head.out_features, widths,
                           {g: len(k) for g, k in kept.items()}, maps)
  source = full.state_dict()
  idx = {g: torch.as_tensor(np.asarray(k, np.int64)) for g, k in kept.items()}
  target = {}
  for info in structure.layers:
    name = info.name.replace("/", ".")
    w = source[f"{name}.weight"]
    if info.out_group is not None:
      w = w.index_select(0, idx[info.out_group])
    if info.in_group is not None:
      w = w.index_select(1, idx[info.in_group])
    target[f"{name}.weight"] = w
    if f"{name}.bias" in source:
      b = source[f"{name}.bias"]
      target[f"{name}.bias"] = b if info.out_group is None else b[idx[info.out_group]]
    if info.kind == "conv":
      bn = bn_name(info.name).replace("/", ".")
      for leaf in ("weight", "bias", "running_mean", "running_var"):
        target[f"{bn}.{leaf}"] = source[f"{bn}.{leaf}"][idx[info.out_group]]
  result = small.load_state_dict(target, strict=False)
  if result.unexpected_keys or any(not k.endswith("num_batches_tracked")
                                   for k in result.missing_keys):
    raise ValueError(f"pruned state does not fit: {result}")
  return small


def feature_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
  """HRank's hook points, one ``[N, C, H, W]`` map per prunable conv, in the Flax
  structure's layer order: the ReLU after each conv-BN, and for a ResNet block's
  ``conv2`` the block output (ReLU after the residual addition)."""
  maps: list[torch.Tensor] = []
  keep = lambda module, inputs, out: maps.append(out)
  keep_relu = lambda module, inputs, out: maps.append(F.relu(out))
  if isinstance(model, TorchCifarResNet):
    points = [(model.stem_bn, keep_relu)]
    for name in model.block_names:
      points += [(getattr(model, name).bn1, keep_relu), (getattr(model, name), keep)]
  elif isinstance(model, TorchVGG):
    points = [(getattr(model, step), keep) for step in model.plan if step != "M"]
  else:
    raise ValueError(f"no HRank hook points for {type(model).__name__}")
  hooks = [module.register_forward_hook(fn) for module, fn in points]
  try:
    model(x)
  finally:
    for h in hooks:
      h.remove()
  return maps
