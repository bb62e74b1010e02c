"""composemesh: a service mesh for Docker Compose and plain container hosts."""

__version__ = "0.1.0"
__all__ = ["__version__"]
