"""Text generation with the KV cache."""
from .generate import generate

__all__ = ["generate"]
