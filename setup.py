"""Package discovery only; everything else is in pyproject.toml.

pyproject.toml maps each root folder to ``seqzoo.<folder>``; setuptools' own ``find`` would name the
packages ``models``, ``ops.gla``, …, so this lists every package below those roots under its
``seqzoo.`` name. A new folder with an ``__init__.py`` is picked up without editing anything.
"""

from setuptools import find_packages, setup

ROOTS = ("models", "ops", "eval", "data", "training", "configs")

setup(packages=[f"seqzoo.{name}" for name in find_packages(include=[*ROOTS, *(f"{root}.*" for root in ROOTS)])])
