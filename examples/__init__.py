"""Example federated jobs."""
