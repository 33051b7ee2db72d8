"""Benchmarks and studies: scripts that measure side by side what Band costs and what it does.

Run them as modules from the repository root, e.g. ``python -m benchmarks.study --help``; the tests import them as
this package (pytest puts the repository root on ``sys.path``).
"""
