"""Test-only: on PYTHONPATH of a job, every optimizer step lasts at least
$POLAR_TEST_MIN_STEP_S seconds, and every generated shard $POLAR_TEST_MIN_SHARD_S seconds:
the pace of a slow machine.

The preemption tests signal a job mid-run; on a fast, idle machine a tiny run could end before
the signal lands. Sleeping after a step or a shard changes no number the run computes.
"""

import os
import time

_MIN_STEP_S = float(os.environ.get("POLAR_TEST_MIN_STEP_S", "0") or 0)
_MIN_SHARD_S = float(os.environ.get("POLAR_TEST_MIN_SHARD_S", "0") or 0)


def _paced(fn, min_s):
    def paced(*args, **kwargs):
        start = time.monotonic()
        out = fn(*args, **kwargs)
        time.sleep(max(0.0, min_s - (time.monotonic() - start)))
        return out

    return paced


if _MIN_STEP_S > 0:
    from polar_scaling import engine

    engine.Engine.train_step = _paced(engine.Engine.train_step, _MIN_STEP_S)

if _MIN_SHARD_S > 0:
    from polar_scaling import data_generate

    data_generate.write_shard = _paced(data_generate.write_shard, _MIN_SHARD_S)
