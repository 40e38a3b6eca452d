"""FP8 with DeepSeek-V3's fine-grained scaling (report 3.3): the exact block-scaled emulation
(``fp8``, the oracle), the optional Transformer-Engine backend (``te``) and the policy of which
modules run in FP8 (``policy``)."""
