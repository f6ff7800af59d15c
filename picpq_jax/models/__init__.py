"""Flax models (NHWC) with channel masks and per-layer bit-widths as variables."""

from picpq_jax.models.layers import GroupSizes
from picpq_jax.models.layers import QConv
from picpq_jax.models.layers import QDense
from picpq_jax.models.layers import batch_norm
from picpq_jax.models.layers import channel_mask
from picpq_jax.models.mobilenetv2 import MobileNetV2
from picpq_jax.models.quantizer import FULL_PRECISION_BITS
from picpq_jax.models.quantizer import FullPrecision
from picpq_jax.models.quantizer import Quantizer
from picpq_jax.models.registry import DTYPES
from picpq_jax.models.registry import MODELS
from picpq_jax.models.registry import ModelSpec
from picpq_jax.models.registry import get_model
from picpq_jax.models.registry import get_spec
from picpq_jax.models.registry import init_variables
from picpq_jax.models.resnet_cifar import CifarResNet
from picpq_jax.models.resnet_cifar import ShortcutCoupling
from picpq_jax.models.resnet_imagenet import ImageNetResNet
from picpq_jax.models.structure import ChannelGroup
from picpq_jax.models.structure import LayerInfo
from picpq_jax.models.structure import ModelStructure
from picpq_jax.models.structure import model_structure
from picpq_jax.models.structure import param_count
from picpq_jax.models.vgg import CifarVGG
