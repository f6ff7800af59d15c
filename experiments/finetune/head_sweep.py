"""Zeroth-order settings over the model's top, and the first-order ceiling of the same objective.

With ``--zo-part head`` MeZO moves only the classifier head over sentence embeddings
computed once (:func:`picpq_jax.finetune.heads.embedded_loss`): a convex multinomial
logistic regression in ``d = H * C + C`` (770) dimensions from the label-prompt
start, optionally pulled towards it (``--head-l2``). Its first-order optimum on the
same k examples, with the same start, pull and early stopping, is the most n-SPSA can
reach; this script measures both, one process, the encoder loaded once:

* per (k, seed): the k-shot draw and the carved split of ``picpq finetune --eval-split
  train`` (``held_out``: ``--eval-size`` training sentences outside the k-shot draw),
  the label head (``heads.start_head``) and ``heads.embedded_loss`` for each ``l2``;
* MeZO (``mezo.make_step``, the estimator ``picpq finetune`` runs) on the full batch
  of the 2k examples for each ``lr:eps:n:l2`` of ``--grid``, scored on the carved
  split every ``--eval-every`` steps;
* the first-order reference: Adam on the same loss for each ``lr:l2`` of
  ``--fo-grid``, scored the same way every ``--fo-eval-every`` steps.

Per k, the setting and step count with the best mean carved-split accuracy over the
seeds is chosen (ties: fewer steps); only then are the chosen settings scored on the
fixed sample of ``--dev-size`` dev sentences that the results table uses. Writes
``results/head_sweep.json`` and ``results/head_sweep.md``.

``--part ffn`` does the same for ``picpq finetune --zo-part ffn`` (LoRA on the top
block's feed-forward output, that block's last LayerNorm and the head, over
activations computed once: :func:`picpq_jax.finetune.heads.ffn_loss`); ``--batch 16``
draws 16 of the 2k examples afresh each MeZO step (``picpq finetune`` shuffles
epochs of batches instead). Writes ``results/<--name>.{json,md}``.

Command (from the repo root):

    .venv/bin/python -m experiments.finetune.head_sweep --data ../shared/data/sst2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench.common import cpu_model
from picpq_jax.finetune import heads, mezo, peft
from picpq_jax.finetune.bert import BertClassifier, BertEncoder, init_classifier
from picpq_jax.finetune.pretrained import load_minilm, load_tokenizer
from picpq_jax.finetune.config import FinetuneConfig
from picpq_jax.finetune.run import build_method, classifier_loss, eval_sample
from picpq_jax.finetune.text import (TextDataset, TokenCache, held_out, k_shot, load_tsv,
                                     sst2_paths, trim_to_bucket)

RESULTS = Path(__file__).resolve().parent / "results"
WHOLE = ("norm", "lora")  # parts whose loss runs the whole model (no cache)
BUCKETS = FinetuneConfig().buckets


def accuracy(theta: dict, x: np.ndarray, y: np.ndarray) -> float:
  """Accuracy of the head ``theta["head"]["classifier"]`` on embeddings ``x`` ``[N, H]``."""
  dense = theta["head"]["classifier"]
  return float(np.mean(np.argmax(x @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]),
                                 -1) == y))


def sample(batch: dict, size: int, key) -> dict:
  """``size`` rows of ``batch`` drawn without replacement by ``key`` (all when 0)."""
  if not size:
    return batch
  pick = jax.random.choice(key, batch["label"].shape[0], (size,), replace=False)
  return {name: v[pick] for name, v in batch.items()}


def mezo_curve(loss_fn, batch, theta, lr, eps, n, steps, every, seed, score, size=0):
  """``[(step, score(theta_step))]`` every ``every`` steps of MeZO on the full batch
  (``size`` 0) or on ``size`` of its rows drawn afresh each step."""
  step = mezo.make_step(loss_fn, eps=eps, n=n, jit=False)

  @jax.jit
  def chunk(theta, first):
    def body(theta, t):
      key = jax.random.fold_in(jax.random.key(seed), t)
      rows = sample(batch, size, jax.random.fold_in(key, 1 << 20))
      return step.step({}, theta, rows, key, lr)[0], None
    return jax.lax.scan(body, theta, first + jnp.arange(every))[0]

  out = [(0, score(theta))]
  for first in range(0, steps, every):
    theta = chunk(theta, first)
    out.append((first + every, score(theta)))
  return out, theta


def adam_curve(loss_fn, batch, theta, lr, steps, every, score):
  """``[(step, score(theta_step))]`` every ``every`` steps of full-batch Adam."""
  opt = optax.adam(lr)

  @jax.jit
  def chunk(theta, state):
    def body(carry, _):
      theta, state = carry
      updates, state = opt.update(jax.grad(loss_fn)(theta, batch), state, theta)
      return (optax.apply_updates(theta, updates), state), None
    return jax.lax.scan(body, (theta, state), None, every)[0]

  out, state, thetas = [(0, score(theta))], opt.init(theta), {0: theta}
  for first in range(0, steps, every):
    theta, state = chunk(theta, state)
    out.append((first + every, score(theta)))
    thetas[first + every] = theta
  return out, thetas


def objective(args, model, start, train_tok, l2, seed):
  """``(rows, loss(theta, batch, key), theta0)`` of ``--part`` from the start head:
  the loss ``picpq finetune --zo-part head|ffn`` trains, over the moving part only."""
  if args.part == "head":
    rows, loss = heads.embedded_loss(model, start, train_tok, l2, args.layers)
    n = model.config.num_layers
    top = {f"layer_{i}": start["encoder"][f"layer_{i}"] for i in range(n - args.layers, n)}
    return rows, loss, {"head": start["head"], **({"encoder": top} if top else {})}
  if args.part in WHOLE:  # the whole model's forward, the moving part's leaves only
    frozen, theta0 = whole_method(args).init(jax.random.key(seed), start)
    loss = peft.loss_of(classifier_loss(model), whole_method(args))
    return train_tok, lambda theta, batch, key=None: loss(theta, frozen, batch, None), theta0
  rows, loss = heads.ffn_loss(model, start, train_tok, args.alpha, l2)
  train, _ = heads.ffn_method(model.config.num_layers, args.rank, args.alpha)
  frozen, theta0 = train.init(jax.random.key(seed), start)
  return rows, lambda theta, batch, key=None: loss(peft.merge(frozen, theta), batch, key), theta0


def whole_method(args) -> peft.Method:
  """``--part norm|lora``: the method ``picpq finetune --zo-part`` builds for it."""
  return build_method(args.part, FinetuneConfig(rank=args.rank, alpha=args.alpha,
                                                targets=args.targets))


def make_scorer(args, model, params, tok, labels, chunk=100):
  """``score(theta) -> accuracy`` on tokenized sentences, their frozen part computed
  here once (sentence embeddings, or the top block's feed-forward cache); ``--part
  norm|lora`` runs the whole model, sentences sorted by length and each chunk cut to
  a bucket of its longest (``trim_to_bucket``)."""
  if args.part in WHOLE:
    method = whole_method(args)
    frozen, _ = method.init(jax.random.key(0), params)  # no head, no adapter in it

    @jax.jit
    def whole_logits(frozen, theta, ids, mask):
      p, extras = method.combine(frozen, theta, None)
      return model.apply({"params": p}, ids, mask, **extras)

    order = np.argsort(tok.attention_mask.sum(1), kind="stable")

    def score_whole(theta):
      right = 0
      for i in range(0, len(labels), chunk):
        rows = order[i:i + chunk]
        b = trim_to_bucket({"input_ids": tok.input_ids[rows],
                            "attention_mask": tok.attention_mask[rows]}, BUCKETS)
        out = whole_logits(frozen, theta, b["input_ids"], b["attention_mask"])
        right += int(np.sum(np.argmax(np.asarray(out), -1) == labels[rows]))
      return right / len(labels)
    return score_whole
  encoder = BertEncoder(model.config, model.dtype)
  if args.part == "head" and not args.layers:
    x = heads.sentence_embeddings(encoder, params["encoder"], tok)
    return lambda theta: accuracy(theta, x, labels)
  if args.part == "head":  # states below the top blocks
    cached = (heads.cached_hidden(encoder, params["encoder"], tok,
                                  model.config.num_layers - args.layers),)
    logits = jax.jit(lambda theta, h, m: heads.top_logits(model, theta, h, m, args.layers))
  else:  # (u, r) of the top block's feed-forward
    cached = heads.ffn_cache(model, params["encoder"], tok)
    logits = jax.jit(lambda theta, u, r, m: heads.ffn_logits(model, theta, u, r, m, args.alpha))

  def score(theta):
    right = 0
    for i in range(0, len(labels), chunk):
      part = slice(i, i + chunk)
      out = logits(theta, *(a[part] for a in cached), tok.attention_mask[part])
      right += int(np.sum(np.argmax(np.asarray(out), -1) == labels[part]))
    return right / len(labels)
  return score


def choose(rows: list[dict]) -> tuple[dict, int, float]:
  """The setting and step with the best mean carved-split accuracy over seeds."""
  best = None
  for setting in {r["setting"] for r in rows}:
    mine = [r for r in rows if r["setting"] == setting]
    for i, (step, _) in enumerate(mine[0]["curve"]):
      mean = statistics.mean(r["curve"][i][1] for r in mine)
      if best is None or mean > best[2] + 1e-9 or (abs(mean - best[2]) <= 1e-9 and step < best[1]):
        best = (setting, step, mean)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="../shared/data/sst2")
  parser.add_argument("--ks", default="16,64")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--eval-size", type=int, default=500, help="carved split size")
  parser.add_argument("--dev-size", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=50000)
  parser.add_argument("--eval-every", type=int, default=5000)
  parser.add_argument("--grid", default="3e-2:1e-3:1:0,1e-2:1e-3:1:1e-2,3e-2:1e-3:1:1e-2,"
                      "1e-1:1e-3:1:1e-2,3e-2:1e-2:1:1e-2,3e-2:1e-3:4:1e-2",
                      help="lr:eps:n:l2,... for MeZO")
  parser.add_argument("--fo-grid", default="1e-3:0,1e-2:0,1e-3:1e-2,1e-2:1e-2,1e-3:1e-1",
                      help="lr:l2,... for Adam")
  parser.add_argument("--fo-steps", type=int, default=2000)
  parser.add_argument("--fo-eval-every", type=int, default=100)
  parser.add_argument("--label-prompts", default="It was terrible.|It was great.")
  parser.add_argument("--label-scale", type=float, default=20.0)
  parser.add_argument("--max-len", type=int, default=64)
  parser.add_argument("--part", default="head", choices=("head", "ffn") + WHOLE,
                      help="what moves: the head (heads.embedded_loss), LoRA on the top "
                      "block's feed-forward output + its LayerNorm + the head (heads.ffn_loss), "
                      "or, through the whole model, every LayerNorm + the head (norm) or "
                      "LoRA on --targets of every block + the head (lora)")
  parser.add_argument("--targets", default="query|value", help="--part lora: LoRA targets")
  parser.add_argument("--layers", type=int, default=0,
                      help="--part head: also the top N encoder blocks (--zo-layers)")
  parser.add_argument("--rank", type=int, default=8, help="--part ffn or lora: LoRA rank")
  parser.add_argument("--alpha", type=float, default=16.0, help="--part ffn or lora: LoRA alpha")
  parser.add_argument("--batch", type=int, default=0,
                      help="MeZO rows per step, drawn afresh each step (0: all 2k)")
  parser.add_argument("--name", default="", help="results/<name>.{json,md} (default: "
                      "head_sweep, or ffn_sweep for --part ffn)")
  args = parser.parse_args()
  name = args.name or f"{args.part}_sweep"
  command = "python -m experiments.finetune.head_sweep " + shlex.join(sys.argv[1:])
  t0 = time.time()
  paths = sst2_paths(args.data)
  train_all, dev = load_tsv(paths.train), eval_sample(load_tsv(paths.dev), args.dev_size)
  pre, cache = load_minilm(None), TokenCache(load_tokenizer(None))
  model = BertClassifier(pre.config, train_all.num_classes, "sentence")
  params = init_classifier(jax.random.key(0), model, pre.params)
  scorer = lambda ds: make_scorer(args, model, params, cache(ds, args.max_len), ds.labels)  # noqa: E731
  tokenize = lambda texts: cache(TextDataset(tuple(texts), np.zeros(len(texts), np.int32)),  # noqa: E731
                                 args.max_len)
  prompts = tuple(args.label_prompts.split("|"))
  mezo_grid = [tuple(float(v) for v in s.split(":")) for s in args.grid.split(",") if s]
  fo_grid = [tuple(float(v) for v in s.split(":")) for s in args.fo_grid.split(",") if s]
  zo_rows, fo_rows, problems = [], [], {}
  for k in (int(v) for v in args.ks.split(",")):
    for seed in (int(v) for v in args.seeds.split(",")):
      train = k_shot(train_all, k, seed)
      carved = held_out(train_all, train, args.eval_size)
      train_tok = cache(train, args.max_len)
      start = heads.start_head("labels", model, params, tokenize, train_tok, prompts=prompts,
                               scale=args.label_scale)
      score = scorer(carved)
      losses = {}
      for l2 in sorted({s[-1] for s in mezo_grid} | {s[-1] for s in fo_grid}):
        rows, losses[l2], theta0 = objective(args, model, start, train_tok, l2, seed)
      batch = {"input_ids": jnp.asarray(rows.input_ids), "label": jnp.asarray(rows.labels),
               "attention_mask": jnp.asarray(rows.attention_mask)}
      problems[(k, seed)] = (losses, batch, theta0)
      for lr, eps, n, l2 in mezo_grid:
        curve, _ = mezo_curve(losses[l2], batch, theta0, lr, eps, int(n), args.steps,
                              args.eval_every, seed, score, args.batch)
        zo_rows.append({"k": k, "seed": seed, "setting": f"{lr:g}:{eps:g}:{int(n)}:{l2:g}",
                        "curve": curve})
        print(f"mezo k={k} seed={seed} {zo_rows[-1]['setting']}: "
              + " ".join(f"{a:.3f}" for _, a in curve) + f" ({time.time() - t0:.0f} s)",
              flush=True)
      for lr, l2 in fo_grid:
        curve, _ = adam_curve(losses[l2], batch, theta0, lr, args.fo_steps,
                              args.fo_eval_every, score)
        fo_rows.append({"k": k, "seed": seed, "setting": f"{lr:g}:{l2:g}", "curve": curve})
        print(f"adam k={k} seed={seed} {fo_rows[-1]['setting']}: start {curve[0][1]:.3f} "
              f"best {max(a for _, a in curve):.3f} end {curve[-1][1]:.3f}", flush=True)

  # Choose on the carved split, then (and only then) score the choice on dev.
  dev_score = scorer(dev)
  chosen = {}
  for k in sorted({r["k"] for r in fo_rows}):
    z_setting, z_step, z_carved = (choose([r for r in zo_rows if r["k"] == k]) if zo_rows
                                   else ("0:0:1:0", 0, float("nan")))
    f_setting, f_step, f_carved = choose([r for r in fo_rows if r["k"] == k])
    lr, eps, n, l2 = (float(v) for v in z_setting.split(":"))
    f_lr, f_l2 = (float(v) for v in f_setting.split(":"))
    per_seed = []
    for (kk, seed), (losses, batch, theta0) in problems.items():
      if kk != k:
        continue
      _, theta = mezo_curve(losses[l2], batch, theta0, lr, eps, int(n), z_step or 1,
                            z_step or 1, seed, dev_score, args.batch) if z_step else (None, theta0)
      _, thetas = adam_curve(losses[f_l2], batch, theta0, f_lr, max(f_step, 1),
                             max(f_step, 1), dev_score)
      per_seed.append({"seed": seed, "start_dev": dev_score(theta0),
                       "mezo_dev": dev_score(theta), "adam_dev": dev_score(thetas[f_step])})
    chosen[k] = {"mezo": {"lr": lr, "eps": eps, "n": int(n), "l2": l2, "steps": z_step,
                          "carved_mean": z_carved},
                 "adam": {"lr": f_lr, "l2": f_l2, "steps": f_step, "carved_mean": f_carved},
                 "dev": per_seed}
    print(k, json.dumps(chosen[k]), flush=True)
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = {"command": command, "cpu": cpu_model(), "load": os.getloadavg(),
         "wall_time_s": time.time() - t0, "chosen": chosen, "mezo": zo_rows, "adam": fo_rows}
  (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
  (RESULTS / f"{name}.md").write_text(report(out))
  print(report(out))


def report(out: dict) -> str:
  def stat(values):
    return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
            if len(values) > 1 else f"{values[0]:.3f}")

  words = out["command"].split()

  def option(flag, default):
    return words[words.index(flag) + 1] if flag in words else default

  part, layers = option("--part", "head"), option("--layers", "0")
  what = {"head": "head" if layers == "0" else f"head and the top {layers} encoder block(s)",
          "ffn": "ffn (LoRA on the top block's FFN output + its LayerNorm + head)",
          "norm": "norm (every LayerNorm's scale and shift + the head, whole model)",
          "lora": f"lora (rank {option('--rank', '8')} on {option('--targets', 'query|value')} "
                  "of every block + the head, whole model)"}
  lines = [f"# MeZO over the {what[part]}: settings and the first-order ceiling "
           "(carved split -> dev)", "",
           f"    {out['command']}", "",
           f"{out['cpu']}, load average at the end {out['load'][0]:.1f} (shared 2-CPU "
           f"machine), {out['wall_time_s'] / 60:.1f} min wall.", "",
           "Carved split: training sentences outside each k-shot draw (`held_out`, as "
           "`picpq finetune --eval-split train`); every setting and step count below is "
           "chosen on it, the dev column is computed once, for the choice.", "",
           "| k/class | method | chosen setting | steps | carved acc (mean) | dev start | "
           "dev after (mean ± sd over seeds) |", "|---|---|---|---|---|---|---|"]
  for k, c in out["chosen"].items():
    dev = c["dev"]
    m, a = c["mezo"], c["adam"]
    if m["steps"]:  # (a ceiling-only run has no MeZO grid)
      lines.append(f"| {k} | MeZO {part} (n-SPSA) | lr {m['lr']:g}, eps {m['eps']:g}, n {m['n']}, "
                   f"l2 {m['l2']:g} | {m['steps']} | {m['carved_mean']:.3f} | "
                   f"{stat([d['start_dev'] for d in dev])} | {stat([d['mezo_dev'] for d in dev])} |")
    lines.append(f"| {k} | Adam {part} (first-order ceiling) | lr {a['lr']:g}, l2 {a['l2']:g} | "
                 f"{a['steps']} | {a['carved_mean']:.3f} | {stat([d['start_dev'] for d in dev])} "
                 f"| {stat([d['adam_dev'] for d in dev])} |")
  lines += ["", "Carved-split accuracy of every MeZO setting (mean over seeds) at each "
            "evaluated step:", ""]
  for k in sorted({r["k"] for r in out["mezo"]}):
    for setting in dict.fromkeys(r["setting"] for r in out["mezo"] if r["k"] == k):
      mine = [r for r in out["mezo"] if r["k"] == k and r["setting"] == setting]
      means = [statistics.mean(r["curve"][i][1] for r in mine) for i in range(len(mine[0]["curve"]))]
      lines.append(f"- k={k} lr:eps:n:l2 = {setting}: " + " ".join(f"{v:.3f}" for v in means))
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
