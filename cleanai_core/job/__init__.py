"""The pruning job (``cleanai prune``) as a library: options in :mod:`.config`
(:class:`PruneConfig`, documented once), inputs in :mod:`.inputs`, the run in :mod:`.run`,
the output folder's guards in :mod:`.outputs`, and the optional sensitivity
(:mod:`.auto`) and recovery (:mod:`.recovery`) steps.

Example::

    from cleanai_core.job import PruneConfig, run_job

    report = run_job(PruneConfig(model="torchvision:resnet18", data="val/", out="pruned/", ratio=0.4))
"""

from cleanai_core.job.config import DEFAULTS, PruneConfig, resolve_config
from cleanai_core.job.run import execute, run_job

__all__ = ["DEFAULTS", "PruneConfig", "execute", "resolve_config", "run_job"]
