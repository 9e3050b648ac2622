"""Judging answers: the refusal-phrase and classifier judges, coherence checks and judged evaluation runs.
"""
