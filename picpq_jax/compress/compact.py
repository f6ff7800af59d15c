"""Compaction: the kept channels of a masked model, sliced out into a smaller dense one.

After the search a model's ``masks`` say which channels survive (DESIGN.md,
"Compaction is real"). :func:`compact` builds the same architecture with every
channel group as wide as its kept channels (the models' static ``group_sizes``
field) and slices each variable to match:

* a conv kernel ``[kh, kw, I, O]`` keeps the input channels its ``in_group`` kept
  and the output channels its ``out_group`` kept; a depthwise kernel
  ``[kh, kw, 1, C]`` keeps only output channels (its group's); a dense kernel
  ``[I, O]`` likewise, where ``I`` may be a flattened ``H * W * C`` (channels
  fastest, as ``reshape`` flattens NHWC);
* a bias, and a BatchNorm's scale, bias, mean and var, along its group's channels
  (a BatchNorm belongs to the group of the conv/dense layer whose output it reads);
* quantizer parameters and the ``quant`` bit-widths are copied unchanged;
* ``masks`` become all ones of the new sizes;
* parameterless couplings that a model exposes through ``shortcut_couplings()``
  (the CIFAR ResNets' option-A shortcuts) are re-indexed: each kept source channel
  goes to the compacted position of its target channel if that one is kept, and is
  dropped otherwise.

The small model's logits equal the masked model's: a masked channel is exactly zero
wherever it is read, so the kernel slices it meets add nothing. That needs an
activation quantizer with ``q(0) == 0`` (DoReFa, PACT, symmetric LSQ) and a weight
quantizer that acts on each weight alone given its ``qparams`` (LSQ's learnt
step). A weight quantizer whose scale is a statistic of the
whole kernel (DoReFa's ``max |tanh W|``) sees only the kept weights after
compaction, so where the largest weight sat in a pruned filter (or read a pruned
input channel) the quantized weights differ. :func:`zero_pruned_weights` zeroes
those weights, which leaves the masked model's full-precision logits unchanged
and makes its DoReFa logits equal the compacted model's; call it once after the
search, before quantization-aware fine-tuning (the zeroed weights get no gradient,
so they stay zero).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax.errors import UserError
from picpq_jax.models.layers import QConv, QDense
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.registry import get_model
from picpq_jax.models.structure import LayerInfo, ModelStructure, model_structure

Array = jax.Array
Path = tuple[str, ...]


def kept_channels(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The indices of each group's kept channels.

  Args:
    masks: ``{group: [C_g]}`` of 0/1 (any float or int dtype).

  Returns:
    ``{group: int64 [k_g]}``, ascending, ``k_g >= 1``.
  """
  kept = {}
  for group, mask in masks.items():
    mask = np.asarray(mask)
    if mask.ndim != 1 or not np.isin(mask, (0, 1)).all():
      raise UserError(f"mask {group!r} must be a vector of 0/1, got shape {mask.shape} "
                      f"with values {np.unique(mask)[:5]}; threshold it before compacting")
    kept[group] = np.flatnonzero(mask == 1)
    if not kept[group].size:
      raise UserError(f"group {group!r} keeps no channel; keep at least one per group "
                      "(prune_to_budget's safeguard does)")
  return kept


def pad_channels(kept: Mapping[str, np.ndarray], sizes: Mapping[str, int],
                 multiple: int) -> dict[str, np.ndarray]:
  """Each group's kept channels plus its first pruned ones, up to a multiple.

  A compacted group of 7 or 13 channels runs slower on XLA:CPU than one of 8 or
  16 (vector widths; ``experiments/bench/compacted.py``), so :func:`compact` can
  keep a few pruned channels as padding. They stay masked (their ``masks`` entry
  is 0) and their weights are zeroed, so the logits do not change.

  Args:
    kept: ``{group: int [k_g]}`` ascending, from :func:`kept_channels`.
    sizes: ``{group: C_g}``, the full widths.
    multiple: pad ``k_g`` up to ``min(C_g, multiple * ceil(k_g / multiple))``.

  Returns:
    ``{group: int64 [k'_g]}`` ascending, ``kept[g]`` a subset of it.
  """
  if multiple < 1:
    raise UserError(f"pad multiple must be at least 1, got {multiple}")
  padded = {}
  for group, index in kept.items():
    want = min(sizes[group], -(-index.size // multiple) * multiple)
    pruned = np.setdiff1d(np.arange(sizes[group]), index)
    padded[group] = np.sort(np.concatenate([index, pruned[:want - index.size]]))
  return padded


def _input_mask(info: LayerInfo, structure: ModelStructure, masks: Mapping[str, Array],
                kernel: Array) -> Array | None:
  """The 0/1 factor ``[I]`` of a kernel's input axis; ``None`` for the image input
  and for depthwise kernels (their single input channel follows the output)."""
  if info.in_group is None or info.depthwise:
    return None
  mask = masks[info.in_group]
  return jnp.tile(mask, kernel.shape[-2] // structure.group(info.in_group).size)


def zero_pruned_weights(variables: Mapping[str, Any], structure: ModelStructure) -> dict:
  """Zeroes every kernel weight that writes or reads a pruned channel.

  ``kernel[..., i, o] *= m_in[i] * m_out[o]`` for each conv/dense layer, with the
  masks of its ``in_group`` and ``out_group`` (a depthwise kernel only by
  ``m_out``; a flattened dense input ``H * W * C`` by ``m_in`` tiled ``H * W``
  times). Those weights only ever meet zeroed channels, so the masked model's
  full-precision logits do not change; a weight quantizer with a kernel-wide
  scale (DoReFa) then sees exactly the weights :func:`compact` keeps. Jittable:
  masks are traced, ``structure`` is static.

  Args:
    variables: ``{"params", "batch_stats", "masks", "quant"}``.
    structure: the model's :class:`ModelStructure`.

  Returns:
    ``variables`` with new kernels (float32, same shapes); the rest shared.
  """
  masks = variables["masks"]
  flat = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
  for info in structure.layers:
    kernel = flat[f"{info.name}/kernel"]
    if info.out_group is not None:
      kernel = kernel * masks[info.out_group].astype(kernel.dtype)
    in_mask = _input_mask(info, structure, masks, kernel)
    if in_mask is not None:
      kernel = kernel * in_mask.astype(kernel.dtype)[:, None]
    flat[f"{info.name}/kernel"] = kernel
  return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}


def _compose_index(index: tuple[int, ...], source_kept: np.ndarray,
                   target_kept: np.ndarray) -> tuple[int, ...]:
  """A coupling's index map on the kept channels: target ``t`` of the small model
  reads the small model's position of ``index[target_kept[t]]``, or -1 if dropped."""
  position = {int(c): p for p, c in enumerate(source_kept)}  # -1 is never a key
  return tuple(position.get(index[int(t)], -1) for t in target_kept)


def _small_model(model: nn.Module, kept: Mapping[str, np.ndarray]) -> nn.Module:
  """``model`` with ``group_sizes`` (and ``shortcut_maps``) for the kept channels."""
  fields = {f.name for f in dataclasses.fields(model)}
  if "group_sizes" not in fields:
    raise UserError(f"{type(model).__name__} has no group_sizes field; compact needs a "
                    "picpq_jax model (picpq_jax.models.get_model)")
  updates: dict[str, Any] = {"group_sizes": tuple((g, int(k.size)) for g, k in kept.items())}
  if hasattr(model, "shortcut_couplings"):
    updates["shortcut_maps"] = tuple(
        _compose_index(c.index, kept[c.source], kept[c.target])
        for c in model.shortcut_couplings())
  return model.clone(parent=None, **updates)


def _abstract_and_norms(model: nn.Module, input_shape: tuple[int, ...]
                        ) -> tuple[dict, dict[str, str | None]]:
  """``model``'s abstract variables and, per BatchNorm path, the group it normalizes.

  A BatchNorm's group is the ``out_group`` of the conv/dense layer whose output
  array it reads (matched by identity while tracing ``model.init``).
  """
  producers: dict[int, str | None] = {}
  alive: list[Any] = []  # keeps traced outputs alive, so that ids stay unique
  norms: dict[str, str | None] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
      return out
    if isinstance(module, (QConv, QDense)):
      producers[id(out)] = module.out_group
      alive.append(out)
    elif isinstance(module, nn.BatchNorm):
      path = "/".join(module.path)
      if id(args[0]) not in producers:
        raise UserError(f"BatchNorm {path} does not read a conv/dense output directly; "
                        "compact cannot tell which channels it normalizes")
      norms[path] = producers[id(args[0])]
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(record):
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  return abstract, norms


def _take(value: np.ndarray, axis: int, index: np.ndarray | None, block: int = 1) -> np.ndarray:
  """``value`` keeping ``index`` along ``axis``; the axis is ``[block, C]`` flattened."""
  if index is None:
    return value
  shape = value.shape
  axis %= value.ndim
  split = value.reshape(*shape[:axis], block, shape[axis] // block, *shape[axis + 1:])
  kept = np.take(split, index, axis=axis + 1)
  return kept.reshape(*shape[:axis], block * index.size, *shape[axis + 1:])


def _slice_kernel(kernel: np.ndarray, info: LayerInfo, structure: ModelStructure,
                  kept: Mapping[str, np.ndarray]) -> np.ndarray:
  """A conv ``[kh, kw, I, O]`` or dense ``[I, O]`` kernel on its kept channels."""
  out_idx = kept.get(info.out_group)
  if info.kind == "conv" and info.feature_group_count > 1 and not info.depthwise:
    raise UserError(f"layer {info.name}: grouped convs that are not depthwise cannot be "
                    "compacted")
  kernel = _take(kernel, -1, out_idx)
  if info.in_group is None or info.depthwise:
    return kernel
  in_size = structure.group(info.in_group).size
  in_axis = -2
  if kernel.shape[in_axis] % in_size:
    raise UserError(f"layer {info.name}: {kernel.shape[in_axis]} inputs are not a "
                    f"multiple of group {info.in_group}'s {in_size} channels")
  return _take(kernel, in_axis, kept[info.in_group], kernel.shape[in_axis] // in_size)


def _slice_leaf(path: Path, value: np.ndarray, structure: ModelStructure,
                norms: Mapping[str, str | None], kept: Mapping[str, np.ndarray]) -> np.ndarray:
  """One variable of the full model, sliced to the kept channels (see module doc)."""
  collection, module, leaf = path[0], "/".join(path[1:-1]), path[-1]
  layers = {l.name: l for l in structure.layers}
  if collection == "masks":
    return _take(value, -1, kept["/".join(path[1:])])
  if collection in ("params", "batch_stats") and module in norms:
    return _take(value, -1, kept.get(norms[module]))
  if collection == "params" and module in layers:
    info = layers[module]
    if leaf == "kernel":
      return _slice_kernel(value, info, structure, kept)
    if leaf == "bias":
      return _take(value, -1, kept.get(info.out_group))
  return value  # quant bit-widths, quantizer parameters


def compact(arch_or_model: str | nn.Module, variables: Mapping[str, Any],
            structure: ModelStructure, quantizer: Quantizer | None = None,
            pad_to: int = 1) -> tuple[nn.Module, dict]:
  """Slices the kept channels (mask == 1) into a smaller, dense model.

  Args:
    arch_or_model: the masked model, or its registry name (then built with
      ``structure``'s head width and ``quantizer``).
    variables: its ``{"params", "batch_stats", "masks", "quant"}``.
    structure: ``model_structure(model, input_shape)`` of the masked model.
    quantizer: only with a name: the quantizer the model was trained with
      (default :class:`FullPrecision`).
    pad_to: round every group's width up to a multiple of this by keeping some
      pruned channels (:func:`pad_channels`): masked and with zeroed kernels, so
      the logits are unchanged; the padded model's ``masks`` count the exact
      MACs (``cost_model.cost``) while its structure counts the padded ones.
      1 (the default) keeps exactly the kept channels.

  Returns:
    ``(small_model, small_variables)``: the same architecture with
    ``group_sizes = ((group, kept channels), ...)`` (and re-indexed
    ``shortcut_maps`` where the model has such couplings), and its variables: every
    kernel, bias and BatchNorm entry sliced to the kept channels, ``quant`` and
    quantizer parameters unchanged, masks all ones (zero on padding channels). Its logits equal those of the
    masked model in eval mode (see the module doc for the quantizer caveat).
  """
  model = arch_or_model
  if isinstance(arch_or_model, str):
    model = get_model(arch_or_model, num_classes=structure.layer("head").out_features,
                      quantizer=quantizer or FullPrecision())
  elif quantizer is not None:
    raise UserError("compact: pass quantizer= only with a model name; a model carries its own")
  sizes = {g.name: g.size for g in structure.groups}
  masks = variables["masks"]
  if {g: int(np.shape(m)[0]) for g, m in masks.items()} != sizes:
    raise UserError("compact: the masks do not match the structure's groups; pass the "
                    "model_structure of the model these variables belong to")
  kept = kept_channels(masks)
  if pad_to > 1:
    kept = pad_channels(kept, sizes, pad_to)
  small = _small_model(model, kept)
  abstract, norms = _abstract_and_norms(small, structure.input_shape)
  expected = traverse_util.flatten_dict(abstract)
  flat = traverse_util.flatten_dict(dict(variables))
  if set(flat) != set(expected):
    missing = sorted("/".join(p) for p in set(expected) ^ set(flat))[:3]
    raise UserError(f"compact: variables do not fit the model (e.g. {missing}); pass the "
                    "model (and quantizer) they were made with")
  out = {}
  for path, value in flat.items():
    sliced = _slice_leaf(path, np.asarray(value), structure, norms, kept)
    if sliced.shape != expected[path].shape:
      raise UserError(f"compact: {'/'.join(path)} has shape {sliced.shape} after slicing, "
                      f"the small model needs {expected[path].shape}; quantizer parameters "
                      "must not depend on the kernel's channel counts")
    out[path] = jnp.asarray(sliced, expected[path].dtype)
  small_vars = dict(traverse_util.unflatten_dict(out))
  if pad_to > 1:  # padding channels: zero kernels, so kernel-wide quantizer scales hold
    small_vars = zero_pruned_weights(small_vars, model_structure(small, structure.input_shape))
  return small, small_vars
