"""Clustering: embeddings of rows and the choice of k."""
