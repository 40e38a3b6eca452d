"""Scoring a model outside training: held-out text, packed sets and multiple choice, the
lm-evaluation-harness model, and needle in a haystack (report 4.3, 5.x).

May import: launch.config, launch.checkpointing.
"""
