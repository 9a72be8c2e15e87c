"""MLflow side of atlasd: experiment/run logging, model-version registration, the promotion gate,
aliases, rollback and champion resolution.

Runs as a short-lived child (``python -m registry ...``) so the daemon never imports mlflow.
Imports mlflow and pydantic, and from atlasd only ``atlasd.runspec`` and
``atlasd.settings.redact_url``.

Names used in the MLflow registry (one registered model per policy):
- registered-model tag ``atlasd.policy``: the policy the model belongs to;
- version tag ``atlasd.run_id``: the atlasd run that produced it (one version per run);
- aliases ``challenger`` (the newest registered version) and ``champion`` (the promoted one);
- version tags ``atlasd.decision`` (promote | reject | force | rollback), ``gate.<check>`` (JSON:
  value, threshold, met, reason), ``atlasd.previous_champion`` (the champion it replaced) and, on
  the replaced one, ``previous_champion_of=<version>``;
- version tag ``atlasd.tainted``: how many sessions its run trained on were revoked since
  (``python -m registry taint``; atlasd/lineage.py), and run tag ``atlasd.manifest_hash`` with the
  training and eval manifests logged as the MLflow run's dataset inputs.
"""

from __future__ import annotations

# exit codes of `python -m registry ...` (defined with the trainer's, in atlasd.runspec)
from atlasd.runspec import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NEEDS_GPU, EXIT_OK, EXIT_UNAVAILABLE  # noqa: F401

CHAMPION = "champion"
CHALLENGER = "challenger"

TAG_POLICY = "atlasd.policy"
TAG_RUN_ID = "atlasd.run_id"
TAG_DECISION = "atlasd.decision"
TAG_PREVIOUS = "atlasd.previous_champion"
TAG_PREVIOUS_OF = "previous_champion_of"
TAG_TAINTED = "atlasd.tainted"


class RegistryError(Exception):
    """Bad input or a refused operation (exit 2): retrying will not help."""


class NeedsGpu(Exception):
    """``finalize --defer-measure``: the champion must be re-measured on the GPU (exit 3)."""


class StoreUnavailable(Exception):
    """The MLflow store cannot be reached or written (exit 75): retry later."""
