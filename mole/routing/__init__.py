"""Routing: the router's warm start, the joint phase and routing diagnostics."""
