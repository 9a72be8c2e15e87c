"""Chaos-suite stand-in for the real ``trainers`` package (``python -m trainers run SPEC.json``).

It shadows the real package when ``tests/chaos/standins`` is first on ``PYTHONPATH``: no torch,
a few fast steps, the real telemetry line format, checkpoints, ``result.json`` and exit codes
(:mod:`atlasd.runspec`). See ``__main__.py`` for the knobs.
"""
