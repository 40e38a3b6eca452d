"""Whether a layout fits, from the config alone: what each rank holds at its peak, the FLOPs per
token and the whole token schedule walked step by step (``python -m launch.plan``); and how fast it
runs on a hardware profile (the step-time model, ``--hardware``; ``--search``; the measurements
behind ``python -m launch.calibrate``).

May import: launch.config.
"""
