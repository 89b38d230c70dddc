"""kpid-zoo: Knapsack Pruning with Inner Distillation (Aflalo et al., 2020) as a timm model-zoo generator.

The package is a pipeline, one stage a module:
recipe -> parent -> groups -> importance -> knapsack -> surgery -> distill/train -> evaluate -> export/publish -> registry
"""
__version__ = "0.1.0"

from ._openmp import choose_wait_policy as _choose_wait_policy  # noqa: E402

_choose_wait_policy()  # kpid-zoo commands: OpenMP threads that sleep, not spin, when idle; before torch loads

from . import registry  # noqa: F401,E402  (registers kpid_* models in timm)
from .handlers import LayerHandler, register_layer_handler  # noqa: F401,E402  (teach the engine a layer type)
