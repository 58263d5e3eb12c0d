"""qtk: get open-weights LLMs from the Hugging Face Hub onto GPUs in a smaller form, and prove they still work."""

__version__ = "0.1.0"

__all__ = ["__version__"]
