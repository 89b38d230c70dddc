"""kpid-zoo: Knapsack Pruning with Inner Distillation (Aflalo et al., 2020) as a timm model-zoo generator.

The package is a pipeline, one stage a module, in layers (docs/architecture.md): core (files, recipe, provenance)
-> engine (groups, importance, knapsack, surgery) -> budget (prune, latency) -> training (parent, data, distill,
train, evaluate) -> zoo (export, publish, registry) -> build, dry_run, cli.
"""
from ._version import __version__  # noqa: F401
from .core._openmp import choose_wait_policy as _choose_wait_policy

_choose_wait_policy()  # kpid-zoo commands: OpenMP threads that sleep, not spin, when idle; before torch loads

from .zoo import registry  # noqa: F401,E402  (registers kpid_* models in timm)
from .engine.handlers import LayerHandler, register_layer_handler  # noqa: F401,E402  (teach the engine a layer type)
