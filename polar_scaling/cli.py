"""``polar-train STAGE [CONFIG] [key=value ...] --run-dir DIR``: one run of one stage.

Each stage lives in its own module exposing ``run(config_path, overrides, run_dir) -> dict``
(the summary written to ``done.json``). Modules are imported lazily so ``polar-train --help``
stays fast and a stage's heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from polar_scaling.config import ConfigError
from polar_scaling.errors import (
    Preempted,
    StageError,  # noqa: F401  (re-exported for stages)
)
from polar_scaling.rundir import RunDirError

STAGES = {
    "generate": ("polar_scaling.data_generate", "write trajectories of a policy pool to shards"),
    "lm": ("polar_scaling.lm", "next-token pre-training of a base LM for a ladder size"),
    "pretrain": ("polar_scaling.pretrain", "POLAR pre-training of a reward model"),
    "finetune": ("polar_scaling.finetune", "fine-tune a reward model on ranked preferences"),
    "evaluate": ("polar_scaling.evaluate", "preference accuracy of a reward model"),
    "rft": ("polar_scaling.rft", "PPO of a policy with a POLAR reward model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polar-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                       help="an optional YAML config, then dotted overrides")
        p.add_argument("--run-dir", required=True, type=Path,
                       help="directory holding all of the run's state; relaunching it resumes")
        if name == "generate":
            p.add_argument("--part", type=parse_part, metavar="I/N",
                           help="write only part I of N (shards I, I+N, ...) and its record")
            p.add_argument("--finalize", type=int, metavar="N",
                           help="check the shards of the N parts and write the manifest")
    return parser


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"part {text} is out of range: expected I/N with "
                                         f"0 <= I < N")
    return i, n


def stage_options(args: argparse.Namespace) -> dict:
    """The stage-specific flags of a parsed command line, as keyword arguments of its run()."""
    options = {"part": getattr(args, "part", None), "finalize": getattr(args, "finalize", None)}
    return {k: v for k, v in options.items() if v is not None}


def split_config_args(args: list[str]) -> tuple[Path | None, list[str]]:
    """The first argument without '=' is the config file; the rest are overrides."""
    config, overrides = None, []
    for i, arg in enumerate(args):
        if "=" not in arg and i == 0:
            config = Path(arg)
        elif "=" not in arg:
            raise ConfigError("<command line>", arg, "expected key=value (only the first argument may be a config file)")
        else:
            overrides.append(arg)
    return config, overrides


def run_stage(stage: str, config: Path | None, overrides: list[str], run_dir: Path,
              **options) -> dict:
    """Run one stage in this process (also the entry point the sweep launcher calls);
    ``options``: the stage's own flags (generate: ``part``, ``finalize``)."""
    module_name = STAGES[stage][0]
    module = importlib.import_module(module_name)
    return module.run(config, overrides, Path(run_dir), **options)


def train_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config, overrides = split_config_args(args.args)
        summary = run_stage(args.stage, config, overrides, args.run_dir, **stage_options(args))
    except Preempted as e:
        print(f"polar-train {args.stage}: {e}; relaunch the same --run-dir to resume",
              file=sys.stderr)
        return 143
    except (ConfigError, StageError, RunDirError, FileNotFoundError) as e:
        print(f"polar-train {args.stage}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
