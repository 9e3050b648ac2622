"""The study's data: the vocabulary (schema), prompt sets and their sources, the DuckDB store, paths and resumable chunk caches.

Torch-free: the app's pages import these.
"""
