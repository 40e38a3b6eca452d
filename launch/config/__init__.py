"""The run config tree (``model:``, ``data:``, ``train:``, ``parallel:``) and the report's token-based
schedules with the global batches a layout can run (report 4.2).

May import: nothing else in launch.
"""
