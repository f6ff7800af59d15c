"""The declared pruning graph of every registered model agrees with its weights."""

from __future__ import annotations

import jax
import pytest

from picpq_jax.models import MODELS, MobileNetV2, model_structure

# The residual streams: exactly the groups a residual addition writes into.
COUPLED = {
    "vgg16": set(),
    # Stages 1 (32->16) and 7 (160->320) have one block and no addition.
    "mobilenetv2": {"stage2", "stage3", "stage4", "stage5", "stage6"},
    "resnet18": {"stage1", "stage2", "stage3", "stage4"},
}


def expected_coupled(name: str) -> set[str]:
  """CIFAR ResNet-(6n+2): the stem and every block write stage 1; with n > 1 blocks
  per stage, stages 2 and 3 too (an option-A shortcut has no weights to couple)."""
  if name in COUPLED:
    return COUPLED[name]
  depth = int(name.removeprefix("resnet"))
  return {"stage1", "stage2", "stage3"} if depth > 8 else {"stage1"}


def _kernels(params) -> dict[str, tuple[int, ...]]:
  """``layer path -> kernel shape`` for every leaf named ``kernel``."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path[:-1]): leaf.shape
          for path, leaf in flat if path[-1].key == "kernel"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_declared_once(name, abstract_model):
  _, _, variables, structure = abstract_model(name)
  names = [l.name for l in structure.layers]
  assert len(names) == len(set(names))
  assert set(names) == set(_kernels(variables["params"]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_group_widths_match_writers_and_readers(name, abstract_model):
  _, _, variables, structure = abstract_model(name)
  kernels = _kernels(variables["params"])
  assert {g.name for g in structure.groups} == set(variables["masks"])
  for group in structure.groups:
    assert variables["masks"][group.name].shape == (group.size,)
    assert group.writers and group.readers, group.name
    for w in group.writers:
      layer = structure.layer(w)
      assert layer.out_features == group.size == kernels[w][-1], (group.name, w)
    for r in group.readers:
      layer = structure.layer(r)
      assert layer.in_features == group.size, (group.name, r)
      # Pruning a channel removes one input slice of every non-depthwise reader.
      in_axis = kernels[r][-2] if layer.kind == "conv" else kernels[r][0]
      expected = 1 if layer.depthwise else group.size
      assert in_axis == expected, (group.name, r)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_coupled_groups_are_the_residual_streams(name, abstract_model):
  structure = abstract_model(name)[3]
  assert {g.name for g in structure.groups if g.coupled} == expected_coupled(name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_image_input_and_logits_are_unprunable(name, abstract_model):
  _, spec, _, structure = abstract_model(name)
  first, head = structure.layers[0], structure.layers[-1]
  # Only the image is read ungrouped, and VGG's head (linear1 is kept whole).
  ungrouped = [first.name] + (["head"] if name == "vgg16" else [])
  assert [l.name for l in structure.layers if l.in_group is None] == ungrouped
  assert first.in_features == spec.input_shape[-1]
  assert head.name == "head" and head.out_group is None
  assert head.out_features == spec.num_classes


def test_vgg16_groups(abstract_model):
  structure = abstract_model("vgg16")[3]
  convs = [l for l in structure.layers if l.kind == "conv"]
  assert [l.out_group for l in convs] == [f"conv{i}" for i in range(1, 14)]
  assert [l.in_group for l in convs[1:]] == [f"conv{i}" for i in range(1, 13)]
  assert structure.group("conv13").readers == ("linear1",)
  assert structure.layer("linear1").out_group is None  # kept whole, as in the reference


def test_mobilenetv2_depthwise_follow_their_expansion(abstract_model):
  structure = abstract_model("mobilenetv2")[3]
  dws = [l for l in structure.layers if l.name.endswith("/dw_conv")]
  assert len(dws) == 17 and all(l.depthwise for l in dws)
  for dw in dws:
    block = dw.name.split("/")[0]
    expected = "stem" if block == "stage1_block0" else f"{block}_expand"
    group = structure.group(expected)
    assert dw.in_group == dw.out_group == expected
    assert group.depthwise == (dw.name,)
    assert not group.coupled
    # The group is written by its producer and the depthwise, read by it and the projection.
    producer = "stem_conv" if expected == "stem" else f"{block}/expand_conv"
    assert group.writers == (producer, dw.name)
    assert set(group.readers) == {dw.name, f"{block}/project_conv"}
  stage2 = structure.group("stage2")
  assert stage2.writers == ("stage2_block0/project_conv", "stage2_block1/project_conv")


def test_mobilenetv2_width_mult_continues_streams():
  """At width 0.25 the 8-wide stem, stage 1 and stage 2 form one residual stream."""
  structure = model_structure(MobileNetV2(width_mult=0.25), (32, 32, 3))
  stem = structure.group("stem")
  assert stem.size == 8 and stem.coupled
  assert "stage1" not in {g.name for g in structure.groups}
  assert "stage2_block1/project_conv" in stem.writers


def test_resnet18_shortcuts_write_the_stream(abstract_model):
  structure = abstract_model("resnet18")[3]
  for s in (2, 3, 4):
    group = structure.group(f"stage{s}")
    shortcut = structure.layer(f"stage{s}_block0/downsample_conv")
    assert shortcut.kernel_size == (1, 1) and shortcut.strides == (2, 2)
    assert shortcut.in_group == f"stage{s - 1}"
    assert set(group.writers) == {shortcut.name, f"stage{s}_block0/conv2",
                                  f"stage{s}_block1/conv2"}
  assert set(structure.group("stage1").writers) == {
      "stem_conv", "stage1_block0/conv2", "stage1_block1/conv2"}
  assert structure.layer("stem_conv").out_hw == (112, 112)
  assert structure.layer("stage1_block0/conv1").in_hw == (56, 56)
