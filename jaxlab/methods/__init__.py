"""jaxlab.methods."""
