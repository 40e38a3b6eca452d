"""What moves tensors between ranks: the expert-parallel token dispatcher (``expert``), pipeline
schedules (``dualpipe``: DualPipe, DualPipeV, 1F1B), their simulator (``pipeline_sim``), stage
cutting (``pipeline_stages``), the runtime that runs a schedule over point-to-point
(``pipeline_runtime``) and replica gradient sums (``replicas``). Process groups are created by
the launcher's one group builder and passed in."""
