"""The built-in quantization methods, one module each, registered in
:data:`pytest_qmr.registry.QUANT_METHODS` on import (the registry imports this package lazily
the first time it is read). Their order here is the order suites, markers and the CLI list them.
"""

from . import fp, rtn, gptq, awq, smoothquant, checkpoint, recipe  # noqa: F401  (each registers itself)
from .base import QuantMethod, WeightOnly, fit_group_size, get_method

__all__ = ["QuantMethod", "WeightOnly", "fit_group_size", "get_method"]
