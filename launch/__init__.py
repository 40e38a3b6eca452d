"""The commands users run (``deepspeed launch/pretrain.py``, ``python -m launch.X``), each a thin
file: parse arguments, load the config, call into a package below, print what it wrote.

The machinery lives in the subpackages: ``config`` (the run config tree and the token schedules),
``distributed`` (process groups, DeepSpeed internals), ``checkpointing`` (sharded checkpoints,
weight sources, streamed export), ``training`` (the loop and its parts), ``evaluation``,
``planning`` (the memory planner, the step-time model), ``reporting`` (records and figures) and ``ablation`` (studies).
No subpackage imports a command; each one's docstring names the packages it may import
(``tests/test_imports.py`` checks it).
"""
