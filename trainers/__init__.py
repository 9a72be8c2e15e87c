"""What runs in the training child process: dataset, GKD trainer, evaluation, checkpoints.

Entry point: ``python -m trainers {run,validate,eval} ...``. Imports torch; never imported by
the daemon process."""
