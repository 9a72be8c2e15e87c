"""atlasd: a continual-learning daemon for Atlas SDK agents.

This package is the daemon. It must stay light: it never imports torch, transformers,
trl or mlflow (training runs in ``python -m trainers``, registry work in ``python -m registry``).
"""

__version__ = "0.1.0"
