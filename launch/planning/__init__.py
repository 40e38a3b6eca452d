"""Whether a layout fits, from the config alone: what each rank holds at its peak, the FLOPs per
token and the whole token schedule walked step by step (``python -m launch.plan``).

May import: launch.config.
"""
