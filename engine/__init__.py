"""Refusal Circuit Explorer engine: models, prompts, judging, tuning and the study store.

Pure library code: no Streamlit, no command-line parsing.
"""
