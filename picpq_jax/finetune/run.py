"""``picpq finetune``: train one method end to end, measure it, and write results.json.

SST-2 (``--task sst2``): the pretrained all-MiniLM-L6-v2 encoder gets a classifier
head (:class:`~picpq_jax.finetune.bert.BertClassifier`): drawn at random over mean
pooling (``--head random``), or over the unit sentence embedding as label prompts
(``--head labels``, zero-shot) or a ridge probe fitted on the training examples
(``--head probe``), see :mod:`picpq_jax.finetune.heads`; the start's accuracy is
reported as ``start_eval``. ``--k`` examples per class are drawn from ``train.tsv``
and a fixed sample of ``--eval-size`` sentences of ``dev.tsv`` is the evaluation set
(``--eval-split train``: sentences of ``train.tsv`` outside the training examples,
for choosing settings without dev). Methods:

* first-order (``full``, ``bitfit``, ``prompt``, ``lora``, ``qlora``): Adam over the
  method's trainable part (:func:`picpq_jax.finetune.peft.make_train_step`); every
  method but ``full`` also trains the head (``train_also("^head/")``);
* ``mezo``: zeroth-order SGD (:func:`picpq_jax.finetune.mezo.make_step`) over the
  part chosen by ``--zo-part`` (default every parameter, the paper's MeZO; ``head``
  with ``--zo-layers`` and ``ffn`` run on activations of the frozen part computed
  once, :mod:`picpq_jax.finetune.heads`, and are evaluated through the whole model;
  the other parts run the whole model on each batch cut to the smallest of
  ``--zo-buckets`` that holds its longest sentence, one compiled program per length);
* ``--federated fedit``: FedIT rounds of a first-order method over ``--clients``
  clients holding ``--k`` examples per class each; ``--federated fedkseed``: seed-only
  zeroth-order rounds (:mod:`picpq_jax.finetune.federated`), bytes counted exactly.

Shakespeare (``--task shakespeare``): the small GPT trained from scratch with Adam
on random windows of tinyshakespeare; validation loss and a generated sample.

Every step (or round) is compiled ahead of time once; the compiled program's
``memory_analysis()`` (argument, output, temporary and aliased bytes) is what
``results.json`` reports as ``step_memory``, beside the process's peak RSS and the
median step time (the first step excluded). The trainable state (and Adam's state)
is saved with Orbax every ``--checkpoint-every`` steps; ``--resume`` restores it and
continues with the batches and keys an uninterrupted run would have used (step
``s`` uses ``fold_in(key, s)`` and batch ``s`` of the seeded order), so a resumed run
ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import types
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from picpq_jax import engine
from picpq_jax.errors import UserError
from picpq_jax.finetune import federated as fed
from picpq_jax.finetune import heads, lora, mezo, peft, qlora
from picpq_jax.finetune.bert import BertClassifier, init_classifier
from picpq_jax.finetune.config import CACHED_PARTS, FinetuneConfig
from picpq_jax.finetune.gpt import GPT, GPTConfig, generate, init_gpt
from picpq_jax.finetune.gpt import loss as gpt_loss
from picpq_jax.finetune.memory import compiled_memory, peak_rss_bytes
from picpq_jax.finetune.pretrained import load_minilm, load_tokenizer
from picpq_jax.finetune.text import (TextDataset, TokenCache, TokenizedText, CharVocab,
                                     eval_text_batches, held_out, k_shot, load_text, load_tsv,
                                     random_windows, split_ids, sst2_paths, text_batches,
                                     tinyshakespeare_path, trim_to_bucket)
from picpq_jax.models.structure import param_count
from picpq_jax.utils import format_table, is_primary, tree_bytes

HEAD = "^head/"
NORM = "_norm/"  # embeddings/layer_norm, layer_N/attention_norm and layer_N/mlp_norm
EVAL_BATCH = 64
EVAL_SEED = 0  # the dev sample does not depend on --seed
GPT_EVAL_BATCHES = 8
OTHER = 2**31 - 1  # fold_in data of the keys that are not a step's (pool, validation windows)


class Job(NamedTuple):
  """One run's pieces, run by the engine as a task (:func:`_task`).

  ``step(state, batch, index) -> (state, loss)`` runs one compiled step (round);
  ``batches(start) -> iterator`` yields step ``start``'s batch first;
  ``evaluate(state) -> dict`` of floats; ``info`` goes into results.json.
  """

  state: Any
  step: Callable[[Any, Any, int], tuple[Any, Any]]
  batches: Callable[[int], Iterator[Any]]
  evaluate: Callable[[Any], dict[str, float]]
  total: int
  info: dict[str, Any]


def memory_of(compiled: Any) -> dict[str, int | None]:
  """:func:`picpq_jax.finetune.memory.compiled_memory` of an already compiled
  executable (``jitted.lower(...).compile()``), so that the step the run uses is not
  compiled a second time just to be measured."""
  already = types.SimpleNamespace(lower=lambda: types.SimpleNamespace(compile=lambda: compiled))
  return compiled_memory(already)


def build_method(name: str, config: FinetuneConfig) -> peft.Method:
  """The :class:`~picpq_jax.finetune.peft.Method` called ``name`` with ``config``'s
  options; every method but ``full`` also trains the classifier head in full."""
  if name == "full":
    return peft.full()
  if name == "bitfit":
    return peft.bitfit(HEAD)
  if name == "head":
    return peft.only(HEAD, "head")
  if name == "norm":  # every LayerNorm's scale and shift (embeddings and blocks), the head
    return peft.only(NORM + "|" + HEAD, "norm")
  if name == "prompt":
    return peft.train_also(peft.prompt(config.prompt_length), HEAD)
  if name == "lora":
    return peft.train_also(lora.method(config.targets, config.rank, config.alpha,
                                       config.lora_dropout), HEAD)
  if name == "qlora":
    return peft.train_also(qlora.method(config.targets, config.rank, config.alpha,
                                        config.qlora_bits, config.qlora_block,
                                        dropout=config.lora_dropout, grid=config.qlora_grid,
                                        double_quant=config.qlora_double_quant), HEAD)
  raise UserError(f"unknown fine-tuning method {name!r}: use full, lora, bitfit, prompt, "
                  "norm, head, mezo or qlora")


# ----------------------------------------------------------------------------- data

def eval_sample(ds: TextDataset, size: int) -> TextDataset:
  """A fixed sample of ``size`` examples (``0``: all), in file order; it depends
  only on ``(ds, size)``, so every method and seed is scored on the same sentences."""
  if not size or size >= len(ds):
    return ds
  return ds.subset(np.sort(np.random.default_rng(EVAL_SEED).permutation(len(ds))[:size]))


def client_split(ds: TextDataset, clients: int, seed: int) -> list[np.ndarray]:
  """Indices of ``ds`` for each of ``clients`` clients: each class's examples
  permuted by ``seed`` and dealt out in equal contiguous shares (the remainder
  dropped), so every client holds the same number of every class."""
  shares: list[list[np.ndarray]] = [[] for _ in range(clients)]
  for c in range(ds.num_classes):
    members = np.flatnonzero(ds.labels == c)
    members = members[np.random.default_rng([seed, c, 1]).permutation(len(members))]
    per = len(members) // clients
    for i in range(clients):
      shares[i].append(members[i * per:(i + 1) * per])
  return [np.sort(np.concatenate(s)) for s in shares]


def _rows(data: TokenizedText, indices: np.ndarray) -> TokenizedText:
  return TokenizedText(data.input_ids[indices], data.attention_mask[indices],
                       data.labels[indices])


def _cut(config: FinetuneConfig) -> tuple[int, ...]:
  """The token lengths zeroth-order batches are cut to: ``--zo-buckets`` when the step
  runs the whole model on tokens (not ``--zo-part head``/``ffn``'s cached rows)."""
  return config.buckets if config.zo_part not in CACHED_PARTS else ()


def by_length(compile_at: Callable[[dict, Any], Any], example: dict, compiled: Any,
              buckets: tuple[int, ...], info: dict) -> Callable:
  """``program(batch, trainable) -> (cut batch, compiled step)``: the batch cut to the
  smallest of ``buckets`` that holds its longest sentence (:func:`trim_to_bucket`;
  ``[..., L]`` arrays, one length for a whole federated round) and the program for
  that length, compiled on first use by ``compile_at(batch, trainable)``.
  ``compiled`` is ``example``'s (the uncut length, whose memory is reported);
  ``info["step_compiles"]`` counts the programs."""
  programs = {example["input_ids"].shape[-1]: compiled}
  info["step_compiles"] = 1

  def program(batch, trainable):
    batch = trim_to_bucket(batch, buckets)
    length = batch["input_ids"].shape[-1]
    if length not in programs:
      programs[length] = compile_at(batch, trainable)
      info["step_compiles"] = len(programs)
    return batch, programs[length]
  return program


# ----------------------------------------------------------------------------- SST-2

def classifier_loss(model: BertClassifier) -> Callable:
  """``loss_fn(params, batch, key, prompt=None)``: the classifier's mean cross-entropy on
  ``batch`` (``input_ids``, ``attention_mask`` ``[B, L]``, ``label`` ``[B]``), dropout
  on when ``key`` is given."""
  def loss_fn(params, batch, key, prompt=None):
    train = key is not None
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         prompt=prompt, deterministic=not train,
                         rngs={"dropout": key} if train else None)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss_fn


def _classifier_eval(model: BertClassifier, method: peft.Method, frozen: Any, template: Any,
                     data: TokenizedText) -> tuple[Callable, dict]:
  """``evaluate(trainable) -> {"eval_loss", "eval_accuracy"}`` over ``data`` and the
  compiled evaluation step's memory."""
  def counts(frozen, trainable, batch):
    params, extras = method.combine(frozen, trainable, None)
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         **extras)
    m = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    right = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(right * m)

  first = next(eval_text_batches(data, EVAL_BATCH))
  compiled = jax.jit(counts).lower(frozen, template, first).compile()

  def evaluate(trainable):
    loss = right = 0.0
    for batch in eval_text_batches(data, EVAL_BATCH):
      l, r = compiled(frozen, trainable, batch)
      loss, right = loss + float(l), right + float(r)
    n = len(data.labels)
    return {"eval_loss": loss / n, "eval_accuracy": right / n}
  return evaluate, memory_of(compiled)


def _sst2_job(config: FinetuneConfig, key: jax.Array, print_fn: Callable) -> Job:
  paths = sst2_paths(config.data)
  train_all, dev = load_tsv(paths.train), load_tsv(paths.dev)
  unseen = sorted(set(dev.labels.tolist()) - set(train_all.labels.tolist()))
  if unseen:
    raise UserError(f"{paths.dev} has label {unseen[0]}, which {paths.train} never uses: "
                    f"the head could not learn it; fix the labels")
  clients = config.clients if config.federated else 1
  train = k_shot(train_all, config.k * clients, config.seed) if config.k else train_all
  dev = (held_out(train_all, train, config.eval_size) if config.eval_split == "train"
         else eval_sample(dev, config.eval_size))
  num_classes = train_all.num_classes
  pre = load_minilm(config.weights or None)
  tokenizer = load_tokenizer(config.weights or None)
  cache = TokenCache(tokenizer)
  train_tok, dev_tok = cache(train, config.max_len), cache(dev, config.max_len)

  bert = dataclasses.replace(pre.config, hidden_dropout=config.dropout,
                             attention_dropout=config.dropout)
  model = BertClassifier(bert, num_classes, heads.pooling_for(config.head), remat=config.remat)
  k_head, k_method, k_train = jax.random.split(key, 3)
  params = heads.start_head(
      config.head, model, init_classifier(k_head, model, pre.params),
      lambda texts: cache(TextDataset(tuple(texts), np.zeros(len(texts), np.int32)),
                          config.max_len), train_tok,
      prompts=tuple(config.label_prompts.split("|")), scale=config.label_scale,
      l2=config.probe_l2)
  total_params = param_count(params)
  zo = config.method == "mezo"
  step_data, loss_fn = train_tok, classifier_loss(model)
  if zo and config.zo_part == "head":  # the bottom is frozen: run it once
    step_data, loss_fn = heads.embedded_loss(model, params, train_tok, config.head_l2,
                                             config.zo_layers)
    method = peft.only(heads.top_pattern(config.zo_layers, bert.num_layers), "head")
    scored = method  # how the evaluation rebuilds the whole model
  elif zo and config.zo_part == "ffn":
    step_data, loss_fn = heads.ffn_loss(model, params, train_tok, config.alpha, config.head_l2)
    method, scored = heads.ffn_method(bert.num_layers, config.rank, config.alpha)
  else:
    method = scored = build_method(config.zo_part if zo else config.method, config)
  frozen, trainable = method.init(k_method, params)
  del params, pre
  lr = config.learning_rate
  info = {"num_train": len(train), "num_eval": len(dev), "num_classes": num_classes,
          "seq_len": int(train_tok.input_ids.shape[1]), "total_params": total_params,
          "trainable_params": peft.trainable_count(trainable),
          "frozen_bytes": tree_bytes(frozen), "trainable_bytes": tree_bytes(trainable),
          "learning_rate": lr, "cache_bytes": getattr(loss_fn, "cache_bytes", 0)}
  evaluate, info["eval_memory"] = _classifier_eval(model, scored, frozen, trainable, dev_tok)
  if config.head != "random":  # the start each method must beat
    info["start_eval"] = evaluate(trainable)
  if config.federated:
    return _federated_job(config, model, method, frozen, trainable, loss_fn, train,
                          step_data, evaluate, k_train, info)

  steps_per_epoch = len(train) // config.batch_size
  if steps_per_epoch < 1:
    raise UserError(f"--batch-size={config.batch_size} exceeds the {len(train)} training "
                    "examples: lower --batch-size or raise --k")
  total = config.steps or max(1, round(config.epochs * steps_per_epoch))
  batches = lambda start: text_batches(step_data, config.batch_size, config.seed, start)  # noqa: E731
  example = next(batches(0))
  key0 = jax.random.fold_in(k_train, 0)
  if zo:
    step = mezo.make_step(loss_fn, method, eps=config.mezo_eps, n=config.mezo_n)
    lr_arr = jnp.float32(lr)
    compiled = step.step.lower(frozen, trainable, example, key0, lr_arr).compile()
    state = {"trainable": trainable}
    info["opt_state_bytes"] = 0
    program = by_length(lambda b, t: step.step.lower(frozen, t, b, key0, lr_arr).compile(),
                        example, compiled, _cut(config), info)

    def run(state, batch, index):
      batch, compiled_at = program(batch, state["trainable"])
      theta, out = compiled_at(frozen, state["trainable"], batch,
                               jax.random.fold_in(k_train, index), lr_arr)
      return {"trainable": theta}, out["loss"]
  else:
    train_step = peft.make_train_step(loss_fn, optax.adam(lr), method)
    opt_state = train_step.init(trainable)
    compiled = train_step.step.lower(frozen, trainable, opt_state, example, key0).compile()
    state = {"trainable": trainable, "opt_state": opt_state}
    info["opt_state_bytes"] = tree_bytes(opt_state)

    def run(state, batch, index):
      theta, opt, loss, _ = compiled(frozen, state["trainable"], state["opt_state"], batch,
                                     jax.random.fold_in(k_train, index))
      return {"trainable": theta, "opt_state": opt}, loss
  info["step_memory"] = memory_of(compiled)
  info["steps_per_epoch"] = steps_per_epoch
  return Job(state, run, batches, lambda s: evaluate(s["trainable"]), total, info)


def _federated_job(config, model, method, frozen, trainable, loss_fn, train, train_tok,
                   evaluate, k_train, info) -> Job:
  """FedIT or seed-only ZO rounds; a "step" of the loop is one round."""
  from picpq_jax.federated.distributed import clients_mesh  # pylint: disable=import-outside-toplevel
  shares = client_split(train, config.clients, config.seed)
  per_client = [_rows(train_tok, s) for s in shares]
  sizes = np.array([len(s) for s in shares], np.float32)
  if len(shares[0]) < config.batch_size:
    raise UserError(f"--batch-size={config.batch_size} exceeds a client's {len(shares[0])} "
                    "examples: lower --batch-size or raise --k")
  steps_per_epoch = len(shares[0]) // config.batch_size
  mesh = clients_mesh(config.clients, config.devices)
  e = config.local_steps

  def batches(start):
    its = [text_batches(d, config.batch_size, config.seed + 1000 * c, start * e)
           for c, d in enumerate(per_client)]
    while True:
      rows = [[next(it) for _ in range(e)] for it in its]  # [M][E] of {name: [B, ...]}
      yield {name: np.stack([np.stack([b[name] for b in client]) for client in rows])
             for name in ("input_ids", "attention_mask", "label")}

  example = next(batches(0))
  key0 = jax.random.fold_in(k_train, 0)
  lr = config.learning_rate
  if config.federated == "fedit":
    round_fn = fed.fedit_round(loss_fn, optax.adam(lr), method, mesh)
    compiled = round_fn.lower(frozen, trainable, example, sizes, key0).compile()
    traffic = fed.fedit_traffic(trainable, config.clients)

    def run(state, batch, index):
      theta, out = compiled(frozen, state["trainable"], batch, sizes,
                            jax.random.fold_in(k_train, index))
      return {"trainable": theta}, out["loss"]
  else:
    round_fn = fed.zo_round(loss_fn, method, mesh, pool_size=config.pool_size,
                            eps=config.mezo_eps)
    lr_arr, pool_key = jnp.float32(lr), jax.random.fold_in(k_train, OTHER)
    def lower(batch, trainable):
      return round_fn.lower(frozen, trainable, batch, sizes, key0, lr_arr, pool_key).compile()

    compiled = lower(example, trainable)
    program = by_length(lower, example, compiled, _cut(config), info)
    traffic = fed.zo_traffic(config.clients, e, config.pool_size)

    def run(state, batch, index):
      batch, compiled_at = program(batch, state["trainable"])
      theta, out = compiled_at(frozen, state["trainable"], batch, sizes,
                               jax.random.fold_in(k_train, index), lr_arr, pool_key)
      return {"trainable": theta}, out["loss"]
  info.update({"step_memory": memory_of(compiled), "opt_state_bytes": 0,
               "clients": config.clients, "mesh_devices": int(mesh.devices.size),
               "client_examples": int(len(shares[0])), "local_steps": e,
               "local_epochs_per_round": e / steps_per_epoch,
               "traffic_per_round": traffic.to_dict(),
               "bytes_per_round": traffic.total_bytes})
  return Job({"trainable": trainable}, run, batches, lambda s: evaluate(s["trainable"]),
             config.rounds, info)


# ----------------------------------------------------------------------------- Shakespeare

def _shakespeare_job(config: FinetuneConfig, key: jax.Array, print_fn: Callable) -> Job:
  text = load_text(tinyshakespeare_path(config.data))
  vocab = CharVocab.from_text(text)
  train_ids, val_ids = (jnp.asarray(a) for a in split_ids(vocab.encode(text), 0.1))
  model = GPT(GPTConfig(vocab_size=vocab.size, num_layers=config.gpt_layers, num_heads=4,
                        width=config.gpt_width, context=config.max_len, dropout=config.dropout))
  k_init, k_data, k_train, k_sample = jax.random.split(key, 4)
  params = init_gpt(k_init, model)
  method = peft.full()
  frozen, trainable = method.init(k_init, params)
  del params
  lr = config.learning_rate

  def loss_fn(params, batch, key):
    return gpt_loss(model, params, batch["x"], batch["y"], key)

  def window(index, ids=train_ids, base=k_data):
    x, y = random_windows(jax.random.fold_in(base, index), ids, config.batch_size,
                          config.max_len)
    return {"x": x, "y": y}

  def batches(start):
    index = start
    while True:
      yield window(index)
      index += 1

  tokens_per_epoch = config.batch_size * config.max_len
  total = config.steps or max(1, round(config.epochs * len(train_ids) / tokens_per_epoch))
  train_step = peft.make_train_step(loss_fn, optax.adam(lr), method)
  opt_state = train_step.init(trainable)
  example = window(0)
  compiled = train_step.step.lower(frozen, trainable, opt_state, example,
                                   jax.random.fold_in(k_train, 0)).compile()
  val_batches = [window(i, val_ids, jax.random.fold_in(k_data, OTHER))
                 for i in range(GPT_EVAL_BATCHES)]

  @jax.jit
  def counts(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return ce, jnp.mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32))

  def evaluate(state):
    out = [counts(state["trainable"], b) for b in val_batches]
    return {"eval_loss": float(np.mean([o[0] for o in out])),
            "eval_accuracy": float(np.mean([o[1] for o in out]))}

  def run(state, batch, index):
    theta, opt, loss, _ = compiled(frozen, state["trainable"], state["opt_state"], batch,
                                   jax.random.fold_in(k_train, index))
    return {"trainable": theta, "opt_state": opt}, loss

  def sample(state):
    if not config.sample_length:
      return ""
    prompt = jnp.asarray(vocab.encode(text[:1]))[None]
    out = generate(model, state["trainable"], k_sample, prompt, config.sample_length, 0.8)
    return vocab.decode(np.asarray(out[0]))

  info = {"num_train": int(len(train_ids)), "num_eval": GPT_EVAL_BATCHES * tokens_per_epoch,
          "vocab_size": vocab.size, "context": config.max_len,
          "total_params": param_count(trainable), "trainable_params": param_count(trainable),
          "frozen_bytes": 0, "trainable_bytes": tree_bytes(trainable),
          "opt_state_bytes": tree_bytes(opt_state), "learning_rate": lr,
          "step_memory": memory_of(compiled), "sample": sample}
  return Job({"trainable": trainable, "opt_state": opt_state}, run, batches, evaluate,
             total, info)


# ----------------------------------------------------------------------------- run

def _task(config: FinetuneConfig, job: Job) -> engine.Task:
  """``job`` as a task of the run engine: each step timed and its loss checked."""
  unit = "round" if config.federated else "step"

  def step(state, batch, index):
    t0 = time.perf_counter()
    state, loss = job.step(state, batch, index)
    loss = float(loss)  # waits for the step
    if not np.isfinite(loss):
      raise UserError(f"the training loss became {loss} at {unit} {index + 1}: lower --lr")
    return state, {"train_loss": loss, "step_time_s": time.perf_counter() - t0}

  def evaluate(state, done):
    due = config.eval_every and done % config.eval_every == 0 and done < job.total
    return job.evaluate(state) if due else {}

  return engine.Task(
      init=lambda: job.state, template=job.state, total=job.total, batches=job.batches,
      step=step, evaluate=evaluate, checkpoint_every=config.checkpoint_every,
      meta={"config": config.to_dict()}, unit=unit,
      label=f"{config.task} {config.federated or config.method}")


def run_finetune(config: FinetuneConfig, stop_at_step: int | None = None,
                 print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains, evaluates and measures one fine-tuning run; writes ``results.json``.

  Args:
    config: the run's options.
    stop_at_step: stop after this step (round) as if interrupted (tests; a later
      ``--resume`` continues).
    print_fn: where the summary (and the Shakespeare sample) is printed.

  Returns:
    The results dict: ``eval_accuracy`` and ``eval_loss`` (on the dev sample; next
    character for Shakespeare), ``trainable_params``, ``step_memory`` (bytes of the
    compiled step: ``argument_bytes``, ``output_bytes``, ``temp_bytes``,
    ``alias_bytes``, ``peak_bytes``), ``peak_rss_bytes``, ``median_step_s``,
    ``bytes_per_round`` for federated runs, and the run's sizes.
  """
  t_start = time.time()
  workdir = engine.open_workdir(config)  # checks; writes nothing
  make = _shakespeare_job if config.task == "shakespeare" else _sst2_job
  job = make(config, jax.random.key(config.seed), print_fn)  # checks the data
  if is_primary():
    workdir.write_config()
  outcome = engine.run_task(_task(config, job), workdir.path, resume=workdir.resuming,
                            progress=config.progress, stop_at=stop_at_step)
  state, step, evaluation = outcome.state, outcome.step, outcome.evaluation
  times = [r["step_time_s"] for r in outcome.records
           if r["step"] > outcome.start and "step_time_s" in r]
  resumed = outcome.start > 0
  finished = step >= job.total
  if finished or not evaluation:
    evaluation = job.evaluate(state)
  info = dict(job.info)
  sample = info.pop("sample", None)
  results = {
      "task": config.task, "method": config.method, "federated": config.federated,
      "zo_part": config.zo_part if config.method == "mezo" else None,
      "k": config.k, "seed": config.seed, "remat": config.remat,
      "batch_size": config.batch_size, "max_len": config.max_len,
      "steps": step, "total_steps": job.total, "finished": finished, "resumed": resumed,
      **evaluation, **info,
      "median_step_s": statistics.median(times[1:] or times) if times else None,
      "steps_timed": len(times[1:]) or len(times),
      "peak_rss_bytes": peak_rss_bytes(), "wall_time_s": time.time() - t_start,
      "backend": jax.default_backend(), "devices": jax.device_count(),
  }
  if sample is not None and finished:
    results["sample"] = sample(state)
  if is_primary():
    workdir.write_json("results.json", results)
  shown = [(k, v) for k, v in results.items()
           if not isinstance(v, dict) and k != "sample" and v is not None]
  shown += [(f"step_{k}", v) for k, v in results["step_memory"].items() if v is not None]
  print_fn(format_table(shown))
  if results.get("sample"):
    print_fn("--- sample ---\n" + results["sample"])
  return results
