"""Moved to the :mod:`stealer.classifier` package (config, cache, losses, knockoff, data_free, clone, run);
this name re-exports it for code and tests that import ``stealer.classifier_attacks``."""
from stealer.classifier import *  # noqa: F401,F403
from stealer.classifier import __all__  # noqa: F401
