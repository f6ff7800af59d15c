"""The benchmark suite in its quick mode, so that it never rots: every workload runs
end to end on tiny sizes and writes JSON of the documented shape. Timings are never
asserted; what is asserted is structure and the cross-checks each workload records
(ranks, losses and logits that must agree between implementations).

The PyTorch twins are checked against the Flax models here too: same weights, same
logits (an independent implementation of the same architecture), and the
physically pruned twin against the masked Flax model.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import common
from experiments.bench.__main__ import main, parse
from picpq_jax import compile_options, models
from picpq_jax.compress.compact import kept_channels

TORCH = common.torch_available()
needs_torch = pytest.mark.skipif(not TORCH, reason="PyTorch (the optional torch extra) not installed")


def _random_state(model, seed: int) -> dict:
  """Variables with random BN statistics and affine parameters (not the identity init)."""
  rng = np.random.default_rng(seed)
  variables = models.init_variables(model, jax.random.key(seed), (32, 32, 3))
  bump = lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.2 if x.ndim == 1 else x
  variables["params"] = jax.tree_util.tree_map(bump, variables["params"])
  variables["batch_stats"] = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32), variables["batch_stats"])
  return variables


@needs_torch
@pytest.mark.parametrize("arch", ["resnet8", "vgg16"])
def test_torch_twin_logits_equal_flax(arch):
  import torch
  from experiments.bench import torch_models
  model = models.get_model(arch)
  variables = _random_state(model, 1)
  twin = torch_models.load_flax_variables(torch_models.build(arch), variables).eval()
  x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  want = np.asarray(model.apply(variables, x, train=False))
  with torch.no_grad():
    got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@needs_torch
def test_physically_pruned_twin_equals_masked_model():
  import torch
  from experiments.bench import torch_models
  model = models.get_model("resnet8")
  structure = models.model_structure(model, (32, 32, 3))
  variables = _random_state(model, 3)
  rng = np.random.default_rng(4)
  masks = {}
  for group, mask in variables["masks"].items():
    keep = (rng.uniform(size=mask.shape) > 0.4).astype(np.float32)
    keep[rng.integers(mask.shape[0])] = 1.0
    masks[group] = jnp.asarray(keep)
  masked = {**variables, "masks": masks}
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  want = np.asarray(model.apply(masked, x, train=False))
  full = torch_models.load_flax_variables(torch_models.build("resnet8"), variables)
  pruned = torch_models.prune_resnet(full, structure, kept_channels(masks)).eval()
  assert pruned.stem_conv.out_channels == int(masks["stage1"].sum())
  assert pruned.stage3_block0.conv1.out_channels == int(masks["stage3_block0_mid"].sum())
  with torch.no_grad():
    got = pruned(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_options_parse_and_reject_unknown_workloads():
  cfg, workloads, out_dir = parse(["--quick", "--workloads", "hrank,step", "--batches", "4,8",
                                   "--no-torch"])
  assert workloads == ("hrank", "step") and cfg.batches == (4, 8) and not cfg.use_torch
  assert cfg.hrank_model == "resnet8" and out_dir.name == "picpq_bench_quick"
  with pytest.raises(SystemExit):
    parse(["--workloads", "train"])


@needs_torch
def test_a_model_without_a_torch_twin_fails_before_timing(capsys):
  with pytest.raises(SystemExit):
    parse(["--workloads", "step", "--step-models", "resnet20,mobilenetv2"])
  assert "no PyTorch twin for mobilenetv2" in capsys.readouterr().err
  cfg, _, _ = parse(["--workloads", "step", "--step-models", "mobilenetv2", "--no-torch"])
  assert cfg.step_models == ("mobilenetv2",)


def test_conv_shapes_of_resnet56_count_its_55_convs():
  from experiments.bench.conv_parts import conv_shapes
  structure = models.model_structure(models.get_model("resnet56"), (32, 32, 3))
  # stem; 9 blocks of 2 convs per stage, the first conv of stages 2 and 3 with stride 2
  assert conv_shapes(structure) == {
      (32, 3, 16, 3, 1): 1, (32, 16, 16, 3, 1): 18, (32, 16, 32, 3, 2): 1,
      (16, 32, 32, 3, 1): 17, (16, 32, 64, 3, 2): 1, (8, 64, 64, 3, 1): 17}


def test_thunk_kinds_of_hand_written_hlo():
  from experiments.bench.step_profile import thunk_kinds
  hlo = "\n".join([
      "ENTRY %main (x: f32[8,32,32,16], w: f32[3,3,16,16]) -> f32[16,3,3,16] {",
      "  %x = f32[8,32,32,16]{3,2,1,0} parameter(0)",
      '  %conv.1 = f32[8,32,32,16]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, '
      'dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/jvp(M)/conv"}',
      '  %convolution = f32[8,32,32,16]{3,2,1,0} convolution(%g, %w2), window={size=3x3 '
      'pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/transpose(jvp(M))/c"}',
      "  %convolution.4 = f32[16,3,3,16]{3,2,1,0} convolution(%a, %b), window={size=32x32 "
      "pad=1_1x1_1}, dim_labels=b01f_01io->b01f",
      "  %ynn_fusion.2 = f32[16]{0} fusion(%x), kind=kCustom, calls=%c1",
      "  %add_fusion = f32[16]{0} fusion(%x), kind=kLoop, calls=%c2",
      "  %copy.3 = f32[3,3,16,16]{3,2,1,0} copy(%w)",
      "  ROOT %dot.1 = f32[8,16]{1,0} dot(%p, %q), lhs_contracting_dims={1}",
      "  %wrapped_slice = f32[1]{0} fusion(%x), kind=kLoop",
      "  %all-reduce = f32[16]{0} all-reduce(%x), to_apply=%sum",
  ])
  assert thunk_kinds(hlo) == {
      "conv.1": "conv fwd", "convolution": "conv dgrad", "convolution.4": "conv wgrad",
      "ynn_fusion.2": "ynn fusion", "add_fusion": "loop fusion", "copy.3": "copy/transpose",
      "dot.1": "dot", "wrapped_slice": "loop fusion", "all-reduce": "other"}


def _check_timing(row: dict) -> None:
  assert row["reps"] == len(row["times_s"]) >= 1
  assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]


def test_quick_suite_writes_every_workload(tmp_path, monkeypatch):
  # the same option set on every CPU: the profile counts XLA's own convolution thunks,
  # which XLA's defaults would hand to YNNPACK fusions
  monkeypatch.setenv(compile_options.ENV, "ynn-reduce")
  argv = ["--quick", "--out-dir", str(tmp_path)] + ([] if TORCH else ["--no-torch"])
  written = main(argv)
  assert set(written) == {"compile", "step", "hrank", "evolution", "compact", "convs",
                          "profile", "accuracy"}
  results = {name: json.loads(path.read_text()) for name, path in written.items()}
  for name, res in results.items():
    assert res["schema"] == common.SCHEMA_VERSION and res["rows"], name
    env = res["environment"]
    assert set(env["versions"]) >= {"python", "jax", "jaxlib", "flax", "torch"}
    assert env["versions"]["jax"] == jax.__version__ and env["cpu_model"]
    assert env["cpu_vector_extensions"] == compile_options.vector_extensions()
    assert len(res["loadavg_start"]) == 3 and len(res["loadavg_end"]) == 3
    assert "--quick" in env["command"]
    untimed = ("profile", "accuracy")  # the profile sums traced thunks; accuracy times nothing
    for row in res["rows"] if name not in untimed else ():
      _check_timing(row)

  frameworks = {r["framework"] for r in results["compile"]["rows"]}
  assert frameworks == ({"jax.jit", "torch.compile"} if TORCH else {"jax.jit"})
  for row in results["compile"]["rows"]:
    assert all(run["total_s"] > 0 for run in row["runs"])

  step = results["step"]
  assert step["matmul_peak"]["peak_gflops"] > 0
  kinds = {(r["kind"], r["framework"]) for r in step["rows"]}
  assert ("train", "jax.jit") in kinds and ("infer", "jax.jit") in kinds
  if TORCH:
    assert ("train", "torch.compile") in kinds and ("infer", "torch.eager") in kinds
  for row in step["rows"]:  # FLOPs from the model's MACs: 2 per MAC, x3 for a train step
    per_mac = 6 if row["kind"] == "train" else 2
    macs = models.model_structure(models.get_model(row["model"]), (32, 32, 3)).macs
    assert row["gflop"] == pytest.approx(per_mac * macs * row["batch"] / 1e9)

  hrank = results["hrank"]
  methods = {r["method"] for r in hrank["rows"]}
  assert {"ours.svd", "ours.bidiagonal"} <= methods
  for pair, agree in hrank["agreement"].items():  # numpy's rule on (nearly) the same maps
    # JAX and PyTorch maps differ by rounding, which can flip a borderline singular value
    assert agree["fraction_equal"] >= (0.99 if "torch" not in pair else 0.9), pair

  evo = results["evolution"]
  for row in evo["rows"]:
    if row["variant"].startswith("jax.population"):
      assert row["compiles_during_timed_calls"] == 0  # new genes never recompile
  # the same candidates' losses; vmap and map batch the SGD steps differently, and the
  # full run measured up to 2.9e-4 on losses near 2 (float32 rounding over tau_hat steps)
  for variant, diff in evo["max_loss_diff_vs_loop"].items():
    assert diff < 1e-3, variant

  convs = results["convs"]  # resnet8: stem, then one block (two convs) per stage
  layers = {(r["hw"], r["c_in"], r["c_out"], r["kernel"], r["stride"]): r["layers"]
            for r in convs["rows"]}
  assert layers == {(32, 3, 16, 3, 1): 1, (32, 16, 16, 3, 1): 2, (32, 16, 32, 3, 2): 1,
                    (16, 32, 32, 3, 1): 1, (16, 32, 64, 3, 2): 1, (8, 64, 64, 3, 1): 1}
  assert {(r["framework"], r["part"]) for r in convs["rows"]} >= {
      (fw, part) for fw in ("jax", "jax+xla", "jax+bf16") for part in ("fwd", "dgrad", "wgrad")}
  if TORCH:  # JAX's forward, input and weight gradients equal PyTorch's (bf16: to its rounding)
    for r in convs["rows"]:
      if r["framework"] == "jax+bf16":
        assert 1e-4 < r["max_rel_diff_vs_torch"] < 3e-2, r
      elif r["framework"] != "torch":
        assert r["max_rel_diff_vs_torch"] < 1e-5, r

  prof = results["profile"]  # resnet8: 7 convs; the stem's input (images) needs no gradient
  calls = {r["kind"]: r["calls_per_step"] for r in prof["rows"]}
  assert (calls["conv fwd"], calls["conv dgrad"], calls["conv wgrad"]) == (7, 6, 7)
  assert all(r["ms_per_step"] >= 0 for r in prof["rows"])
  assert sum(r["ms_per_step"] for r in prof["rows"]) > 0

  accuracy = results["accuracy"]["rows"]  # the library's float32 step: float64's gradient
  assert [r["variant"] for r in accuracy] == ["jax.jit"] and accuracy[0]["gradient_error"] < 1e-4

  comp = results["compact"]
  assert comp["max_logit_diff"] < 1e-4
  assert comp["macs"]["compacted"] < comp["macs"]["masked"]
  assert comp["macs"]["compacted"] == pytest.approx(comp["macs"]["masked_effective"], rel=0.02)
  assert comp["macs"]["compacted"] <= comp["macs"]["compacted+pad8"] <= comp["macs"]["masked"]
  assert {r["variant"] for r in comp["rows"]} >= {
      "jax.masked", "jax.compacted", "jax.compacted+pad8", "jax.masked+tuned",
      "jax.compacted+tuned"}
  tuned = comp["conv_tuning"]["jax.compacted+tuned b8"]["shapes"]
  assert tuned and all(set(r["seconds"]) == {"xla", "input_taps", "output_taps"}
                       for r in tuned.values())
