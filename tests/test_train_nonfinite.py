"""NaN/Inf guard: non-finite steps skip the update (training recovers afterwards), are counted, are never
checkpointed, and K consecutive ones stop the run with the last good checkpoint kept."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mirage_jax.train import data as data_lib
from mirage_jax.train import loop
from train_cli import fast_config, read_metrics

BAD_STEPS = {3, 4, 7, 8, 9}  # batches (0-based) carrying a NaN: two alone, then three in a row


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real = data_lib.make_source

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            index = self.inner.step
            batch = next(self.inner)
            if index in BAD_STEPS:
                batch["video"][0, 0, 0, 0, 0] = np.nan
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, s):
            self.inner.set_state(s)

    monkeypatch.setattr(data_lib, "make_source", lambda *a, **k: Poisoned(real(*a, **k)))
    cfg = fast_config(train__steps=20, train__max_nonfinite_steps=3, checkpoint__save_every=2,
                      checkpoint__async_save=False, checkpoint__keep_last_n=10)
    with pytest.raises(loop.NonFiniteError, match=r"3 consecutive non-finite steps \(train.max_nonfinite_steps=3\) "
                                                  r"ending at step 10"):
        loop.Trainer(cfg, str(tmp_path)).run()
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert math.isnan(rows[4]["loss"]) and math.isnan(rows[5]["loss"])
    assert math.isfinite(rows[6]["loss"]) and math.isfinite(rows[7]["loss"])  # params were not poisoned
    assert rows[9]["nonfinite_total"] == 4
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 6]  # 4, 8 and 10 fell inside non-finite streaks
