"""Data sources and the input pipeline.

Sources return an :class:`ImageDataset` (uint8 NHWC images, int32 labels) held
in host memory, or for large tfds datasets (ImageNet) with images decoded on
demand (:class:`LazyImages`); the pipeline splits, batches (per host) and
augments it.
"""

from picpq_jax.data.cifar_pickle import load_cifar_pickle
from picpq_jax.data.dataset import ImageDataset
from picpq_jax.data.embedded import load_embedded
from picpq_jax.data.image_folder import default_cache_dir
from picpq_jax.data.image_folder import load_image_folder
from picpq_jax.data.lazy import center_crop
from picpq_jax.data.lazy import CenterCrop
from picpq_jax.data.lazy import LazyImages
from picpq_jax.data.lazy import random_resized_crop
from picpq_jax.data.lazy import random_resized_crop_box
from picpq_jax.data.lazy import RandomResizedCrop
from picpq_jax.data.pipeline import augment
from picpq_jax.data.pipeline import augmentation
from picpq_jax.data.pipeline import AUGMENTATIONS
from picpq_jax.data.pipeline import batch_indices
from picpq_jax.data.pipeline import channel_stats
from picpq_jax.data.pipeline import CIFAR10_MEAN
from picpq_jax.data.pipeline import CIFAR10_STD
from picpq_jax.data.pipeline import EVAL_CENTER_CROP
from picpq_jax.data.pipeline import eval_batches
from picpq_jax.data.pipeline import iterate_batches
from picpq_jax.data.pipeline import normalize
from picpq_jax.data.pipeline import steps_per_epoch
from picpq_jax.data.pipeline import train_val_split
from picpq_jax.data.sources import load_dataset
from picpq_jax.data.tfds_source import load_tfds

__all__ = (
    "AUGMENTATIONS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CenterCrop",
    "EVAL_CENTER_CROP",
    "ImageDataset",
    "LazyImages",
    "RandomResizedCrop",
    "augment",
    "augmentation",
    "batch_indices",
    "center_crop",
    "channel_stats",
    "default_cache_dir",
    "eval_batches",
    "iterate_batches",
    "load_cifar_pickle",
    "load_dataset",
    "load_embedded",
    "load_image_folder",
    "load_tfds",
    "normalize",
    "random_resized_crop",
    "random_resized_crop_box",
    "steps_per_epoch",
    "train_val_split",
)
