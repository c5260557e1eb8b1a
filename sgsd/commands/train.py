"""`sgsd train`: run SGSD or a baseline from a config (no arguments: the embedded offline demo)."""

NAME = "train"
HELP = "train with SGSD or a baseline (default: the embedded offline demo, configs/demo.yaml)"


def add_arguments(parser):
    parser.add_argument(
        "--config",
        "-c",
        default="demo",
        help="YAML file, or the name of a packaged config (demo, tiny, paper/qwen3-1.7b/sgsd, "
        "paper/ablations/no_polarity, ...; `sgsd config --list` lists them)",
    )
    parser.add_argument(
        "--output-dir", "-o", help="run folder (default: train.output_dir or runs/METHOD-TIME)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that already holds a run (deletes it)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. objective.tau=0.5 train.steps=50"
    )


def run(args) -> int:
    import time

    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path
    from sgsd.errors import UserError

    started = time.perf_counter()
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if args.resume and not cfg.train.output_dir:
        raise UserError("--resume needs the run folder: pass --output-dir RUN_DIR")

    from sgsd.tracking import check_installed

    check_installed(cfg.train.report_to)  # before the model load: a missing package is a one-line hint
    from sgsd.trainer import Trainer, default_run_dir

    run_dir = default_run_dir(cfg)
    if args.resume:  # checked before the model is loaded, which can take minutes
        from sgsd.checkpoint import complete_checkpoints

        if not complete_checkpoints(run_dir):
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    elif _holds_a_run(run_dir):
        if not args.overwrite:
            raise UserError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over"
            )
        _clear_run(run_dir)
    print(f"run folder: {run_dir}")
    trainer = Trainer(cfg, run_dir, resume=args.resume)
    trainer.train()
    if trainer.is_main:
        from sgsd.summary import format_summary, run_summary

        print(format_summary(run_summary(run_dir, wall_s=time.perf_counter() - started), "sgsd train"))
    # every rank leaves the process group together: a rank that exits while gloo's threads still serve
    # another can abort ("terminate called without an active exception", exit -6)
    trainer.acc.wait_for_everyone()
    trainer.acc.end_training()
    return 0


RUN_CONTENTS = (
    "metrics.jsonl",
    "checkpoints",
    "eval",
    "tensorboard",
    "wandb",
    "report",
    "bank",
    "config.yaml",
)


def _holds_a_run(run_dir) -> bool:
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()


def _clear_run(run_dir) -> None:
    """Remove what a previous run wrote (only the trainer's own files and folders)."""
    import shutil

    for name in RUN_CONTENTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
