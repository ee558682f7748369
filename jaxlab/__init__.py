"""jaxlab: ten published methods as pure-functional JAX/Flax models with compiled training steps."""

__version__ = "0.1.0"
