"""lwjax: convex layer-wise and end-to-end training of MRI reconstruction networks."""

__version__ = "0.1.0"
