"""An RFT run for the resume tests: ``polar-train rft`` with steps slowed down on request.

usage: rft_job.py RUN_DIR SLEEP_PER_STEP key=value ...
"""

import sys
import time

from polar_scaling import rft_loop
from polar_scaling.cli import train_main

run_dir, sleep, overrides = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
if sleep:
    step = rft_loop.PPOStep.step

    def slow_step(self, i):
        time.sleep(sleep)  # so that a kill can land between two checkpoints
        return step(self, i)

    rft_loop.PPOStep.step = slow_step
sys.exit(train_main(["rft", *overrides, "--run-dir", run_dir]))
