"""`sgsd data show SOURCE`: print a few problems, to check a dataset before training on it."""

NAME = "data"
HELP = "inspect problem sources (reasoning_gym:TASK, champ, hf:PRESET, files)"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the first problems of a source (id, source, question, answer)")
    show.add_argument(
        "source", help="reasoning_gym:TASK[?k=v], champ, hf:PRESET[?split=..&data_files=..], or a file"
    )
    show.add_argument("--n", type=int, default=3, help="problems to print (default 3)")
    show.add_argument(
        "--size", type=int, default=None, help="problems to load/generate (default: all; generators: n)"
    )
    show.add_argument("--seed", type=int, default=0, help="generator and sampling seed")
    show.add_argument("--split", default=None, help="dataset split (hub datasets and folders)")
    show.add_argument(
        "--columns",
        default=None,
        help="column mapping, e.g. q=problem,a=answer (fields: q/question, a/answer, s/solution, id)",
    )


def parse_columns(text: str | None) -> dict[str, str]:
    """'q=problem,a=answer' -> {'q': 'problem', 'a': 'answer'} (sgsd.data accepts the short keys)."""
    from sgsd.errors import DataError

    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise DataError(f"--columns: expected FIELD=COLUMN pairs separated by commas, got {item!r}")
        mapping[key.strip()] = column.strip()
    return mapping


def run(args) -> int:
    from sgsd.data import load_problems

    size = args.size
    if size is None and args.source.startswith("reasoning_gym:"):
        size = args.n
    problems = load_problems(
        args.source, size=size, seed=args.seed, columns=parse_columns(args.columns), split=args.split
    )
    print(f"{args.source}: {len(problems)} problems (showing {min(args.n, len(problems))})")
    for problem in problems[: args.n]:
        print()
        print(f"id:       {problem.id}")
        print(f"source:   {problem.source}")
        print(f"question: {problem.question}")
        print(f"answer:   {problem.answer}")
    return 0
