"""`sgsd probe`: does the teacher signal separate correct from wrong rollouts? (sgsd/probe.py)

sgsd probe -c demo probe.problems=32 probe.rollouts=4 rollout.max_new_tokens=384 -o probe-out
sgsd probe -c demo probe.planted=pairs.json -o probe-out     # reuses the rollouts already there
"""

from __future__ import annotations

NAME = "probe"
HELP = "measure whether the teachers' support separates correct from wrong rollouts, per estimator"


def add_arguments(parser):
    parser.add_argument(
        "--config", "-c", default="demo", help="YAML file or packaged config name (as for train)"
    )
    parser.add_argument(
        "--output-dir", "-o", help="output folder (default: probe.output_dir or runs/probe-TIME)"
    )
    parser.add_argument(
        "--analyse-only",
        action="store_true",
        help="report on the rounds already saved in the output folder (loads no model)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. probe.problems=32 rollout.max_new_tokens=384"
    )


def run(args) -> int:
    import time
    from pathlib import Path

    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    out = (
        args.output_dir
        or cfg.probe.output_dir
        or str(Path("runs") / f"probe-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    print(f"probe folder: {out}")
    from sgsd.probe import run_probe

    run_probe(cfg, out, analyse_only=args.analyse_only)
    return 0
