"""Workflows: jobs that compose the layers below (training a model from a catalog, the demo pipeline)."""
