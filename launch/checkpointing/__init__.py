"""Sharded checkpoints any layout reads back, where a model's weights come from (a run, one of its
checkpoints, a HF directory) and the streamed export of a checkpoint to HF tensors.

May import: launch.config, launch.distributed.
"""
