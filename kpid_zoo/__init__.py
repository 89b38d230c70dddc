"""kpid-zoo: Knapsack Pruning with Inner Distillation (Aflalo et al., 2020) as a timm model-zoo generator.

The package is a pipeline, one stage a module, in layers (docs/architecture.md): core (files, recipe, provenance)
-> engine (groups, importance, knapsack, surgery) -> budget (prune, latency) -> training (parent, data, distill,
train, evaluate) -> zoo (export, publish, registry) -> build, dry_run, cli.

`import kpid_zoo` registers the `kpid_*` models in timm and does nothing else: the public names below (`__all__`,
docs/api.md) are imported from their modules on first use (PEP 562, as huggingface_hub does), so the pruning
engine, fvcore and Accelerate load only when a program asks for them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core._openmp import choose_wait_policy as _choose_wait_policy

_choose_wait_policy()  # kpid-zoo commands: OpenMP threads that sleep, not spin, when idle; before torch loads

from .zoo import registry  # noqa: F401,E402  (registers kpid_* models in timm)

logging.getLogger(__name__).addHandler(logging.NullHandler())  # a library: silent unless the application logs

# {module (relative to the package): {public name: name in that module}}. A public name differs from its module's
# name only where the module's name would be a submodule's: `kpid_zoo.build` and `kpid_zoo.dry_run` stay the
# modules (importing a submodule rebinds its name on the package, so a function of that name would be replaced).
_SUBMOD_ATTRS: dict[str, dict[str, str]] = {
    'errors': {'KpidError': 'KpidError', 'UserError': 'UserError'},
    'core.recipe': {'Recipe': 'Recipe', 'RecipeError': 'RecipeError', 'load_recipe': 'load_recipe'},
    'engine.handlers': {'LayerHandler': 'LayerHandler', 'register_layer_handler': 'register_layer_handler'},
    'engine.groups': {'GroupGraph': 'GroupGraph', 'discover_groups': 'discover_groups'},
    'engine.importance': {'taylor_importance': 'taylor_importance', 'magnitude_importance': 'magnitude_importance'},
    'engine.flops': {'count_flops': 'count_flops', 'count_params': 'count_params'},
    'engine.knapsack': {'solve_knapsack': 'solve_knapsack'},
    'engine.surgery': {'ArchSpec': 'ArchSpec', 'build_pruned': 'build_pruned', 'prune_model': 'prune_model'},
    'budget.prune': {
        'PruneResult': 'PruneResult',
        'knapsack_prune': 'knapsack_prune',
        'prune_from_recipe': 'prune_from_recipe',
    },
    'training.evaluate': {'evaluate': 'evaluate'},
    'zoo.export': {'export_model': 'export_model'},
    'zoo.publish': {'publish': 'publish'},
    'zoo.registry': {'create_kpid': 'create_kpid'},
    'build': {'build_from_recipe': 'build'},
    'dry_run': {'dry_run_from_recipe': 'dry_run'},
}
_ATTR_TO_MODULE = {name: (module, attr) for module, names in _SUBMOD_ATTRS.items() for name, attr in names.items()}

# spelled out for linters and type checkers (`from kpid_zoo import *`); tests/test_public_api.py keeps it the map's
__all__ = [
    '__version__',
    'KpidError',
    'UserError',
    'Recipe',
    'RecipeError',
    'load_recipe',
    'LayerHandler',
    'register_layer_handler',
    'GroupGraph',
    'discover_groups',
    'taylor_importance',
    'magnitude_importance',
    'count_flops',
    'count_params',
    'solve_knapsack',
    'ArchSpec',
    'build_pruned',
    'prune_model',
    'PruneResult',
    'knapsack_prune',
    'prune_from_recipe',
    'evaluate',
    'export_model',
    'publish',
    'create_kpid',
    'build_from_recipe',
    'dry_run_from_recipe',
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here (the next lookup does not come back)."""
    if name not in _ATTR_TO_MODULE:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    module, attr = _ATTR_TO_MODULE[name]
    value = getattr(importlib.import_module(f'.{module}', __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the same names, imported for type checkers and IDEs (tests/test_public_api.py keeps them equal)
    from .budget.prune import PruneResult, knapsack_prune, prune_from_recipe
    from .build import build as build_from_recipe
    from .core.recipe import Recipe, RecipeError, load_recipe
    from .dry_run import dry_run as dry_run_from_recipe
    from .engine.flops import count_flops, count_params
    from .engine.groups import GroupGraph, discover_groups
    from .engine.handlers import LayerHandler, register_layer_handler
    from .engine.importance import magnitude_importance, taylor_importance
    from .engine.knapsack import solve_knapsack
    from .engine.surgery import ArchSpec, build_pruned, prune_model
    from .errors import KpidError, UserError
    from .training.evaluate import evaluate
    from .zoo.export import export_model
    from .zoo.publish import publish
    from .zoo.registry import create_kpid
