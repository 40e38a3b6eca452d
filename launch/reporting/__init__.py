"""A run's records as figures read them (``metrics.jsonl``), and the figures themselves: shared by
the W&B logger, ``python -m launch.dashboard`` and ablation comparisons.

May import: nothing else in launch.
"""
