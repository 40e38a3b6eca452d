"""Loss spikes (``train.spike``): a step whose loss or global gradient norm exceeds ``factor`` x the
median of the last ``window`` steps is a spike. The trainer asks once the gradients are reduced,
before the optimizer applies them (``ds_internals.gated_step``); a spike is skipped (no optimizer
step, router biases and EMA unchanged, the batch consumed and logged) or stops the run. Skipped
steps join the history too: the median ignores a few outliers, and a lasting shift (a new
learning-rate phase) becomes the new normal after window / 2 steps instead of skipping every step
from then on. Nothing is judged before ``window`` steps. The history is part of the checkpoint's
train state, so a resumed run judges as the uninterrupted one would.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from launch.config.run_config import SpikeConfig

KEYS = ("loss", "grad_norm")


class SpikeGuard:
    def __init__(self, config: SpikeConfig):
        self.config = config
        self.history = {key: deque(maxlen=config.window) for key in KEYS}
        self.skipped = 0  # steps skipped so far in the run

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """Why the step is a spike, or None."""
        if len(self.history["loss"]) < self.config.window:
            return None
        for key, value in zip(KEYS, (loss, grad_norm)):
            median = float(np.median(self.history[key]))
            if value > self.config.factor * median:
                return (f"{key} {value:.4g} > {self.config.factor:g} x {median:.4g}, the median of the last "
                        f"{self.config.window} steps")
        return None

    def add(self, loss: float, grad_norm: float) -> None:
        """Every step joins the history, skipped or not."""
        for key, value in zip(KEYS, (loss, grad_norm)):
            self.history[key].append(value)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, **{key: list(values) for key, values in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]
        for key in KEYS:
            self.history[key].clear()
            self.history[key].extend(state[key][-self.config.window:])
