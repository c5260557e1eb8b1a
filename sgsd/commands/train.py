"""`sgsd train`: run SGSD or a baseline from a config (no arguments: the embedded offline demo)."""

NAME = "train"
HELP = "train with SGSD or a baseline (default: the embedded offline demo, configs/demo.yaml)"


def add_arguments(parser):
    parser.add_argument(
        "--config",
        "-c",
        default="demo",
        help="YAML file, or the name of a packaged config (demo, sgsd, opsd, grpo, ...; see `sgsd configs`)",
    )
    parser.add_argument(
        "--output-dir", "-o", help="run folder (default: train.output_dir or runs/METHOD-TIME)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. objective.tau=0.5 train.steps=50"
    )


def run(args) -> int:
    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path
    from sgsd.errors import UserError

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if args.resume and not cfg.train.output_dir:
        raise UserError("--resume needs the run folder: pass --output-dir RUN_DIR")

    from sgsd.trainer import Trainer, default_run_dir

    run_dir = default_run_dir(cfg)
    if args.resume:  # checked before the model is loaded, which can take minutes
        from sgsd.checkpoint import complete_checkpoints

        if not complete_checkpoints(run_dir):
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    print(f"run folder: {run_dir}")
    trainer = Trainer(cfg, run_dir, resume=args.resume)
    trainer.train()
    return 0
