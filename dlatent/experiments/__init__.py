"""Experiments: the spec and the run machinery (`dlatent.experiments.core`), and one module per model family that registers its experiments."""
from .core import *
