"""fineray: fine-tune LLMs on Ray."""
__version__ = "0.1.0"
