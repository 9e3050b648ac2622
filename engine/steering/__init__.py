"""Steering: the `Steering` spec composing ablation, addition and SAE feature clamps, and its limits.
"""
