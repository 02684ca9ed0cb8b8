"""The package version, in one place: setup.py reads this file and ``fastvit_ops.__version__`` imports it."""
__version__ = "0.1.0"
