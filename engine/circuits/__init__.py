"""Sparse feature circuits: attribution patching, circuit discovery and faithfulness, component effects, the refusal metric, similarity between categories' circuits, and the verdict with its calibration and decodability.
"""
