"""PIC-PQ: filter property, physics-inspired importance, pruning to a budget,
bit-width assignment, quantizers, cost model, evolution, compaction and export.

Each step is a pure function that can be called alone (in a notebook) or composed;
:func:`run_compress` chains them into the ``picpq compress`` pipeline.
"""

from picpq_jax.compress.bits import assign_bits, uniform_bits
from picpq_jax.compress.bits import depth_thirds_max_bits
from picpq_jax.compress.bits import layer_sparsity
from picpq_jax.compress.bits import reference_max_bits
from picpq_jax.compress.compact import compact
from picpq_jax.compress.compact import kept_channels
from picpq_jax.compress.compact import pad_channels
from picpq_jax.compress.compact import zero_pruned_weights
from picpq_jax.compress.config import CompressConfig
from picpq_jax.compress.cost_model import Cost
from picpq_jax.compress.cost_model import LayerCosts
from picpq_jax.compress.cost_model import compression_ratios
from picpq_jax.compress.cost_model import cost
from picpq_jax.compress.cost_model import full_cost
from picpq_jax.compress.cost_model import layer_costs
from picpq_jax.compress.criteria import bn_gamma
from picpq_jax.compress.criteria import feature_map_rank
from picpq_jax.compress.criteria import filter_property
from picpq_jax.compress.criteria import filter_property_rank
from picpq_jax.compress.criteria import l1_norm
from picpq_jax.compress.criteria import l2_norm
from picpq_jax.compress.evolution import FitnessSpec
from picpq_jax.compress.evolution import Population
from picpq_jax.compress.evolution import SearchData
from picpq_jax.compress.evolution import candidate_loss
from picpq_jax.compress.evolution import evolve
from picpq_jax.compress.evolution import population_loss
from picpq_jax.compress.export import ExportInfo
from picpq_jax.compress.export import Prequantized
from picpq_jax.compress.export import export
from picpq_jax.compress.export import load_exported
from picpq_jax.compress.numerics import clip_ste
from picpq_jax.compress.numerics import round_ste
from picpq_jax.compress.numerics import uniform_quantize
from picpq_jax.compress.pic import fp_std
from picpq_jax.compress.pic import init_genes
from picpq_jax.compress.pic import mutate
from picpq_jax.compress.pic import mutation_step
from picpq_jax.compress.pic import pic_importance
from picpq_jax.compress.pic import prunable_layers
from picpq_jax.compress.pipeline import run_compress
from picpq_jax.compress.prune import PruneResult
from picpq_jax.compress.prune import prune_to_budget, prune_uniform
from picpq_jax.compress.quantizers import LSQ
from picpq_jax.compress.quantizers import PACT
from picpq_jax.compress.quantizers import DoReFa
from picpq_jax.compress.quantizers import calibrate_lsq
from picpq_jax.compress.search import SearchConfig
from picpq_jax.compress.search import run_search
