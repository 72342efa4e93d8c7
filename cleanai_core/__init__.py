"""CleanAI: structured pruning of trained PyTorch models, scored on your test data.

Example::

    from cleanai_core import StructuredPruner, WeightActivationImportance

    importance = WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
    pruner = StructuredPruner(model, example_inputs, importance, pruning_ratio=0.3)
    pruner.collect_activations(test_loader, num_batches=10)
    pruned_model = pruner.prune()
    pruner.report()
"""

from cleanai_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "DependencyGraph",
    "GradualPruner",
    "PruningHistory",
    "PruningPlan",
    "PruningSchedule",
    "PruneConfig",
    "StructuredPruner",
    "WeightActivationImportance",
    "__version__",
    "hookimpl",
    "load_pruned",
    "recover",
    "run_job",
]

_LAZY = {
    "DependencyGraph": "cleanai_core.graph.dependency",
    "GradualPruner": "cleanai_core.gradual",
    "PruningHistory": "cleanai_core.history",
    "PruningPlan": "cleanai_core.planning",
    "PruningSchedule": "cleanai_core.gradual",
    "PruneConfig": "cleanai_core.job",
    "StructuredPruner": "cleanai_core.pruner",
    "WeightActivationImportance": "cleanai_core.scoring",
    "load_pruned": "cleanai_core.io",
    "recover": "cleanai_core.recovery",
    "run_job": "cleanai_core.job",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cleanai_core' has no attribute {name!r}")
