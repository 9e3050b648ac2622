"""Precompute: the command line that builds a study store (`python -m precompute --help`)."""
