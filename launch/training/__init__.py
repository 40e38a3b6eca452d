"""The pre-training loop and its parts: the trainer, the rank's part of the model, forward/backward,
data set-up, the host EMA, metrics, MoE statistics, memory readings and validation during training.

May import: launch.config, launch.distributed, launch.checkpointing, launch.evaluation, launch.reporting.
"""
