"""jaxlab.federated."""
