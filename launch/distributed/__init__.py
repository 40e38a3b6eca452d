"""Every process group of a run, built in one place, and every reach into DeepSpeed beyond its
documented API (expert groups, parameter marks, the engine, ZeRO-1's optimizer fragments).

May import: launch.config.
"""
