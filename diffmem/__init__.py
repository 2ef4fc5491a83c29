"""diffmem: fast, exact measurement of memorization in diffusion models."""
from . import _native  # loads the compiled ops (or announces the PyTorch fallback)
from . import knn, memorization, optimal

__version__ = "0.1.0"
__all__ = ["knn", "memorization", "optimal", "__version__"]
