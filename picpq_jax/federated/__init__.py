"""Federated split training over a ``clients`` device mesh.

Partitioning (IID, Dirichlet, k classes per client), cutting any model of the library
into client and server parts, SplitFed-V1 and a sequential-server variant, FedAvg and
centralized baselines expressed with ``jax.shard_map``, sample-weighted averaging with
``psum``, partial participation, exact communication accounting with optional k-bit
smashed data, a PIC-PQ-compressed client (pruned, low-bit front) with its edge cost, and
the ``picpq federated`` run.
"""

from picpq_jax.federated.averaging import fedavg_weights
from picpq_jax.federated.averaging import weighted_average
from picpq_jax.federated.comm import Traffic
from picpq_jax.federated.comm import centralized_traffic
from picpq_jax.federated.comm import fedavg_traffic
from picpq_jax.federated.comm import message_bytes
from picpq_jax.federated.comm import split_traffic
from picpq_jax.federated.comm import tree_bytes
from picpq_jax.federated.config import METHODS
from picpq_jax.federated.config import FederatedConfig
from picpq_jax.federated.distributed import AXIS
from picpq_jax.federated.edge import edge_cost
from picpq_jax.federated.edge import load_compressed
from picpq_jax.federated.edge import load_start
from picpq_jax.federated.distributed import clients_mesh
from picpq_jax.federated.distributed import distributed_env
from picpq_jax.federated.distributed import initialize_if_multihost
from picpq_jax.federated.partition import classes_partition
from picpq_jax.federated.partition import client_batch_indices
from picpq_jax.federated.partition import dirichlet_partition
from picpq_jax.federated.partition import format_histogram
from picpq_jax.federated.partition import iid_partition
from picpq_jax.federated.partition import label_histogram
from picpq_jax.federated.partition import partition_labels
from picpq_jax.federated.partition import participants_per_round
from picpq_jax.federated.partition import sample_participants
from picpq_jax.federated.quantize import quantize_message
from picpq_jax.federated.rounds import centralized_round
from picpq_jax.federated.rounds import parallel_round
from picpq_jax.federated.rounds import sequential_round
from picpq_jax.federated.run import FedState
from picpq_jax.federated.run import run_federated
from picpq_jax.federated.split import SplitModel
from picpq_jax.federated.split import split_model
from picpq_jax.federated.split import valid_cuts
from picpq_jax.federated.steps import PartState
from picpq_jax.federated.steps import model_step
from picpq_jax.federated.steps import split_step

__all__ = (
    "AXIS",
    "FedState",
    "FederatedConfig",
    "METHODS",
    "PartState",
    "SplitModel",
    "Traffic",
    "centralized_round",
    "centralized_traffic",
    "classes_partition",
    "client_batch_indices",
    "clients_mesh",
    "dirichlet_partition",
    "distributed_env",
    "edge_cost",
    "fedavg_traffic",
    "fedavg_weights",
    "format_histogram",
    "iid_partition",
    "initialize_if_multihost",
    "label_histogram",
    "load_compressed",
    "load_start",
    "message_bytes",
    "model_step",
    "parallel_round",
    "participants_per_round",
    "partition_labels",
    "quantize_message",
    "run_federated",
    "sample_participants",
    "sequential_round",
    "split_model",
    "split_step",
    "split_traffic",
    "tree_bytes",
    "valid_cuts",
    "weighted_average",
)
