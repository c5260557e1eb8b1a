"""`sgsd config`: print the resolved configuration (defaults <- file <- overrides)."""

NAME = "config"
HELP = "print the resolved configuration as YAML (validates the file and overrides)"


def add_arguments(parser):
    parser.add_argument(
        "--config", "-c", help="YAML config file or packaged config name (demo, paper/qwen3-1.7b/sgsd, ...)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.tau=0.5")


def run(args) -> int:
    from sgsd.config import dump_config, load_config
    from sgsd.configs import resolve_config_path

    print(dump_config(load_config(resolve_config_path(args.config), args.overrides)), end="")
    return 0
