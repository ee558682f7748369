"""jaxlab.models."""
