"""Ablation studies (report 4.5): a study file's variants of one config run through the launcher,
then compared in the shape of the report's Tables 5-6 and Figure 9.

May import: launch.config, launch.checkpointing, launch.reporting.
"""
