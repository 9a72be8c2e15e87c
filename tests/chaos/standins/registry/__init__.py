"""Chaos-suite stand-in for the real ``registry`` package (``python -m registry COMMAND ...``): a
JSON-file "MLflow" under ``$CHAOS_REGISTRY_DIR``. It shadows the real package when
``tests/chaos/standins`` is first on ``PYTHONPATH``; see ``__main__.py``.
"""
