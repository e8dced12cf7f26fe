"""Parallelism applied to the model from outside (expert parallelism, EPLB); the model never
imports this package. Submodules are imported by name, so importing the package costs nothing."""
