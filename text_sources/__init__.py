"""Text in: local ``.jsonl/.json/.parquet/.txt`` files, globs and HF hub datasets read as streams of
documents (``reading``), and the deterministic partition of input files into shards
(``partition``). Below both readers of a corpus: ``tokenizer.train`` and ``data_pipeline.prepare``
(and the evaluation commands) import it; it imports nothing of the project but ``plugins``.
"""
