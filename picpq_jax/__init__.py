"""picpq-jax: PIC-PQ pruning-quantization, federated split training and
memory-efficient fine-tuning, in JAX."""

__version__ = "0.1.0"
