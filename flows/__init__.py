"""Prefect orchestration of mole: thin tasks around ``mole.stages``, the build flow and its deployments."""
