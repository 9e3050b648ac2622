"""Running a model: loading, the chat template, batching, generation, activation capture, hooks (interventions) and the refusal score.

Imports torch (except `chat`).
"""
