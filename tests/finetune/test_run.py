"""run_finetune end to end on a tiny random BERT folder and a tiny TSV dataset.

Parameter counts and traffic are checked against sizes counted by hand
(tests/finetune/tiny_run.py), resume against an uninterrupted run.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from picpq_jax.finetune.config import FinetuneConfig
from picpq_jax.finetune.run import build_method, client_split, eval_sample, run_finetune
from picpq_jax.finetune.text import TextDataset
from tests.finetune import tiny_run
from tests.finetune.tiny_run import HIDDEN, LAYERS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  return tiny_run.make_weights(root / "weights"), tiny_run.make_sst2(root / "sst2")


def config(folders, workdir, **kw) -> FinetuneConfig:
  weights, data = folders
  base = dict(data=str(data), weights=str(weights), workdir=str(workdir), k=4, batch_size=4,
              max_len=16, eval_size=0, steps=3, rank=4, progress=False)
  return FinetuneConfig(**{**base, **kw})


def saved_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def flat(tree):
  """``{"a/b/c": numpy leaf}`` of a nested dict/list pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
          for path, v in leaves}


HEAD = HIDDEN * 2 + 2  # classifier kernel [H, 2] and bias [2]


LORA = dict(method="lora", targets="query|value", checkpoint_every=2)  # dropout 0.1: keys matter


@pytest.fixture(scope="module")
def lora_run(folders, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora")
  return workdir, run_finetune(config(folders, workdir, **LORA), print_fn=lambda s: None)


def test_lora_trains_only_adapters_and_the_head(lora_run):
  workdir, out = lora_run
  # 2 layers x (query, value) x (A [16, 4] + B [4, 16]) + head.
  assert out["trainable_params"] == LAYERS * 2 * 2 * HIDDEN * 4 + HEAD
  assert out["total_params"] == tiny_run.bert_param_count() + HEAD
  assert out["frozen_bytes"] == 4 * tiny_run.bert_param_count()
  assert out["steps"] == 3 and out["finished"] and out["num_train"] == 8
  state = flat(saved_state(workdir, 3)["trainable"])
  assert set(state) == {f"method/encoder/layer_{i}/attention/{p}/lora_{m}" for i in range(2)
                        for p in ("query", "value") for m in "ab"} | {
                            "full/head/classifier/kernel", "full/head/classifier/bias"}
  # B starts at zero; three Adam steps moved it.
  assert all(np.abs(v).max() > 0 for k, v in state.items() if k.endswith("lora_b"))
  results = json.loads((workdir / "results.json").read_text())
  assert results["eval_accuracy"] == out["eval_accuracy"] and 0 <= out["eval_accuracy"] <= 1
  mem = out["step_memory"]
  assert mem["peak_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
                               - mem["alias_bytes"])
  assert out["opt_state_bytes"] >= 2 * 4 * out["trainable_params"]  # Adam's mu and nu
  assert out["peak_rss_bytes"] > 0 and out["median_step_s"] > 0


def test_resume_ends_with_the_same_parameters(folders, lora_run, tmp_path):
  straight_dir, straight = lora_run
  run_finetune(config(folders, tmp_path, **LORA), stop_at_step=2, print_fn=lambda s: None)
  assert not json.loads((tmp_path / "results.json").read_text())["finished"]
  resumed = run_finetune(config(folders, tmp_path, resume=True, **LORA),
                         print_fn=lambda s: None)
  assert resumed["resumed"] and resumed["steps"] == 3
  a, b = flat(saved_state(straight_dir, 3)), flat(saved_state(tmp_path, 3))
  assert set(a) == set(b) and any(k.startswith("opt_state") for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert resumed["eval_loss"] == straight["eval_loss"]
  losses = lambda d: [r["train_loss"] for r in map(json.loads, open(d / "metrics.jsonl"))
                      if "train_loss" in r]
  assert losses(straight_dir) == losses(tmp_path) and len(losses(tmp_path)) == 3


def test_bitfit_and_prompt_trainable_parts(folders):
  from picpq_jax.finetune import BertClassifier, init_classifier, load_minilm
  from picpq_jax.finetune.peft import trainable_count
  pre = load_minilm(folders[0])
  params = init_classifier(jax.random.key(0), BertClassifier(pre.config, 2), pre.params)
  conf = config(folders, "unused", prompt_length=3)
  _, trainable = build_method("bitfit", conf).init(jax.random.key(1), params)
  # embedding LayerNorm; per layer q, k, v, output, 2 LayerNorms, intermediate, output.
  biases = HIDDEN + LAYERS * (4 * HIDDEN + 2 * HIDDEN + tiny_run.INTER + HIDDEN)
  assert trainable_count(trainable) == biases + HEAD
  assert all(k.endswith("bias") or k.startswith("head/") for k in flat(trainable))
  frozen, trainable = build_method("prompt", conf).init(jax.random.key(1), params)
  assert trainable_count(trainable) == 3 * HIDDEN + HEAD
  assert trainable["method"].shape == (3, HIDDEN)


def test_mezo_moves_only_its_part_and_keeps_no_optimizer_state(folders, tmp_path):
  out = run_finetune(config(folders, tmp_path, method="mezo", zo_part="prompt",
                            prompt_length=2, steps=2, dropout=0.0), print_fn=lambda s: None)
  assert out["trainable_params"] == 2 * HIDDEN + HEAD and out["opt_state_bytes"] == 0
  assert out["zo_part"] == "prompt" and np.isfinite(out["eval_loss"])
  assert set(flat(saved_state(tmp_path, 2))) == {
      "trainable/method", "trainable/full/head/classifier/kernel",
      "trainable/full/head/classifier/bias"}


def test_mezo_norm_moves_every_layernorm_and_the_head_only(folders, tmp_path):
  """--zo-part norm: the checkpoint holds exactly the embeddings' and every block's
  LayerNorm scale and shift and the head, and every one of them moved."""
  from picpq_jax.finetune import load_minilm
  out = run_finetune(config(folders, tmp_path, method="mezo", zo_part="norm", head="labels",
                            steps=2, dropout=0.0, lr=1e-1, zo_buckets="7"),
                     print_fn=lambda s: None)
  modules = ["embeddings/layer_norm"] + [f"layer_{i}/{n}" for i in range(LAYERS)
                                         for n in ("attention_norm", "mlp_norm")]
  assert out["trainable_params"] == 2 * len(modules) * HIDDEN + HEAD
  state = flat(saved_state(tmp_path, 2))
  assert set(state) == {f"trainable/encoder/{m}/{leaf}" for m in modules
                        for leaf in ("scale", "bias")} | {
      "trainable/head/classifier/kernel", "trainable/head/classifier/bias"}
  start = flat(load_minilm(folders[0]).params)
  for m in modules:
    for leaf in ("scale", "bias"):
      assert not np.allclose(state[f"trainable/encoder/{m}/{leaf}"], start[f"{m}/{leaf}"])


def test_by_length_cuts_each_batch_and_compiles_each_length_once():
  """The zeroth-order steps' program cache: a batch is cut to its bucket, a new length
  compiles once (counted), a seen length reuses its program."""
  from picpq_jax.finetune.run import by_length
  made, info = [], {}

  def compile_at(batch, trainable):
    made.append(batch["input_ids"].shape[-1])
    return f"program {made[-1]}"

  def batch(longest, length=12):
    mask = (np.arange(length)[None] < np.array([[2], [longest]])).astype(np.int32)
    return {"input_ids": mask, "attention_mask": mask}

  program = by_length(compile_at, batch(12), "program 12", (4, 8), info)
  assert info["step_compiles"] == 1
  for longest, want in [(3, 4), (7, 8), (4, 4), (12, 12), (8, 8)]:
    cut, compiled = program(batch(longest), None)
    assert cut["input_ids"].shape == (2, want) and compiled == f"program {want}"
  assert made == [4, 8] and info["step_compiles"] == 3


def test_mezo_on_the_head_alone_leaves_the_encoder_frozen(folders, tmp_path):
  out = run_finetune(config(folders, tmp_path, method="mezo", zo_part="head", head="labels",
                            steps=2, dropout=0.0, lr=1e-1), print_fn=lambda s: None)
  assert out["trainable_params"] == HEAD and out["zo_part"] == "head"
  state = flat(saved_state(tmp_path, 2))
  assert set(state) == {"trainable/head/classifier/kernel", "trainable/head/classifier/bias"}
  assert state["trainable/head/classifier/kernel"].shape == (HIDDEN, 2)


def test_mezo_ffn_moves_the_top_feed_forward_adapter_norm_and_head(folders, tmp_path):
  """--zo-part ffn end to end: the checkpoint holds exactly the rank-r factors of the
  top block's mlp/output, its mlp_norm and the head; the evaluation folds the factors
  in (the result is finite and the start is scored)."""
  from tests.finetune.tiny_run import INTER, LAYERS
  out = run_finetune(config(folders, tmp_path, method="mezo", zo_part="ffn", head="labels",
                            steps=2, dropout=0.0, lr=1e-1, rank=2), print_fn=lambda s: None)
  assert out["trainable_params"] == HEAD + 2 * (INTER + HIDDEN) + 2 * HIDDEN
  assert np.isfinite(out["eval_loss"]) and "start_eval" in out
  top = f"trainable/encoder/layer_{LAYERS - 1}/"
  assert set(flat(saved_state(tmp_path, 2))) == {
      "trainable/head/classifier/kernel", "trainable/head/classifier/bias",
      top + "mlp/output/lora_a", top + "mlp/output/lora_b", top + "mlp_norm/scale",
      top + "mlp_norm/bias"}


def test_head_l2_adds_the_pull_to_the_loss_the_run_probes(folders, tmp_path):
  """Same keys and batch, with and without --head-l2: at the start (step 1) the two
  probes theta_0 +- eps z add l2/2 eps^2 ||z||^2 to the logged mean loss, and
  ||z||^2 of the HEAD standard normals is about HEAD (chi-square, sd sqrt(2 HEAD))."""
  import json
  losses = {}
  for l2 in (0.0, 1e3):
    workdir = tmp_path / f"l2_{l2}"
    run_finetune(config(folders, workdir, method="mezo", zo_part="head", head="labels",
                        steps=1, dropout=0.0, head_l2=l2), print_fn=lambda s: None)
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    losses[l2] = first["train_loss"]
  extra = losses[1e3] - losses[0.0]
  expected = 0.5 * 1e3 * 1e-3 ** 2 * HEAD
  assert 0.5 * expected < extra < 1.5 * expected


def test_fedit_bytes_per_round(folders, tmp_path):
  fedit = run_finetune(config(folders, tmp_path, method="lora", federated="fedit", clients=2,
                              rounds=1, local_steps=2, k=2, batch_size=2),
                       print_fn=lambda s: None)
  adapters = 4 * fedit["trainable_params"]  # float32
  assert fedit["bytes_per_round"] == 2 * 2 * adapters  # down and up, 2 clients
  assert fedit["client_examples"] == 4 and fedit["steps"] == 1  # k=2 per class each


def test_client_split_and_eval_sample_are_balanced_and_fixed():
  labels = np.array([0] * 6 + [1] * 6, np.int32)
  ds = TextDataset(tuple(f"s{i}" for i in range(12)), labels)
  shares = client_split(ds, 3, seed=5)
  assert sorted(np.concatenate(shares).tolist()) == list(range(12))
  assert all(np.bincount(labels[s], minlength=2).tolist() == [2, 2] for s in shares)
  sample = eval_sample(ds, 5)
  assert len(sample) == 5 and sample.sentences == eval_sample(ds, 5).sentences
  assert list(sample.sentences) == sorted(sample.sentences, key=lambda s: int(s[1:]))
  assert eval_sample(ds, 0) is ds


def test_shakespeare_trains_the_gpt_and_samples(tmp_path):
  text = tmp_path / "tiny.txt"
  text.write_text("To be, or not to be: that is the question.\n" * 40)
  lines = []
  out = run_finetune(FinetuneConfig(task="shakespeare", method="full", data=str(text),
                                    workdir=str(tmp_path / "gpt"), steps=3, batch_size=4,
                                    max_len=16, sample_length=20, gpt_layers=1,
                                    gpt_width=32, progress=False),
                     print_fn=lines.append)
  assert out["vocab_size"] == len(set(text.read_text()))
  assert len(out["sample"]) == 1 + 20 and set(out["sample"]) <= set(text.read_text())
  assert out["sample"] in lines[-1]
  assert out["trainable_params"] == out["total_params"] and np.isfinite(out["eval_loss"])
