"""loraplex: one shared 4-bit base LLM, many tenant LoRA adapters."""

__version__ = "0.1.0"
