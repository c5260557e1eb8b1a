"""`sgsd config`: print the resolved configuration (defaults <- file <- overrides)."""

NAME = "config"
HELP = "print the resolved configuration as YAML (validates the file and overrides)"


def add_arguments(parser):
    parser.add_argument(
        "--config", "-c", help="YAML config file or packaged config name (demo, paper/qwen3-1.7b/sgsd, ...)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.tau=0.5")
    parser.add_argument("--list", action="store_true", help="list the packaged config names and exit")


def run(args) -> int:
    from sgsd.config import dump_config, load_config
    from sgsd.configs import available_configs, resolve_config_path

    if args.list:
        print("\n".join(available_configs()))
        return 0
    print(dump_config(load_config(resolve_config_path(args.config), args.overrides)), end="")
    return 0
