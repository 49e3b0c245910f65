"""Test-only: on PYTHONPATH of a job, every optimizer step lasts at least
$POLAR_TEST_MIN_STEP_S seconds, the pace of a slow machine.

The preemption tests signal a job mid-run; on a fast, idle machine a tiny run could end before
the signal lands. Sleeping after a step changes no number the run computes.
"""

import os
import time

_MIN_STEP_S = float(os.environ.get("POLAR_TEST_MIN_STEP_S", "0") or 0)

if _MIN_STEP_S > 0:
    from polar_scaling import engine

    _train_step = engine.Engine.train_step

    def _paced_train_step(self, *args, **kwargs):
        start = time.monotonic()
        out = _train_step(self, *args, **kwargs)
        time.sleep(max(0.0, _MIN_STEP_S - (time.monotonic() - start)))
        return out

    engine.Engine.train_step = _paced_train_step
