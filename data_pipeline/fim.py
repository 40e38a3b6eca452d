"""Fill-in-the-Middle at document level (report 4.1, after DeepSeekCoder-V2), PSM order:
``<fim_begin> f_pre <fim_hole> f_suf <fim_end> f_middle <eos>``."""

from __future__ import annotations

import numpy as np


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cut ``text`` at two uniformly random character positions into (prefix, middle, suffix)."""
    low, high = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return text[:low], text[low:high], text[high:]
