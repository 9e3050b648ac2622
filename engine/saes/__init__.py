"""Sparse autoencoders: training (SAELens), the pretrained registry, the token corpus, feature reading and attribution, and backup (hydra) features.
"""
