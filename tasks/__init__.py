"""lm-eval task definitions for pytest-qmr (YAML files plus ``utils.py``), shipped as data."""
