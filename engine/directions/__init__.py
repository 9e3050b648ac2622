"""Refusal directions: difference-of-means extraction, scoring candidates by intervention, the surface-form probe, refusal direction optimisation (RDO) and representational independence.
"""
