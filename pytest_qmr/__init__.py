"""pytest-qmr: gate quantized LLMs on math reasoning, locate where it breaks, restore it."""

__version__ = "0.1.0"
