"""forgetbench: a continual-learning benchmark harness for catastrophic forgetting in LLMs."""

__version__ = "0.1.0"
