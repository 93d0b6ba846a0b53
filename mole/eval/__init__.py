"""Evaluation: scoring variants, reports, plots, the verdict and the model card."""
