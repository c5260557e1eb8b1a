"""`sgsd report RUN_DIR... --out DIR`: Table-3-style markdown table and training-dynamics plots."""

from __future__ import annotations

NAME = "report"
HELP = "write a Table-3-style results table and training plots for one or more runs (DIR/report.md)"


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", help="run folders (each with eval/step-N/summary.json)")
    parser.add_argument("--out", required=True, help="output folder for report.md and the PNG figures")
    parser.add_argument("--labels", nargs="+", help="one method label per run (default: train.method)")
    parser.add_argument(
        "--sources", nargs="+", help="test benchmarks as source names or slugs (default: all)"
    )
    parser.add_argument(
        "--validation-sources",
        nargs="+",
        default=[],
        help="held-out sources for a second, validation-selected table",
    )
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window for per-step curves")


def run(args) -> int:
    from sgsd.errors import UserError
    from sgsd.evaluate import source_slug
    from sgsd.report import write_report

    if args.smooth < 1:
        raise UserError(f"--smooth must be >= 1, got {args.smooth}")
    report = write_report(
        args.runs,
        args.out,
        labels=args.labels,
        test_sources=[source_slug(s) for s in args.sources] if args.sources else None,
        validation_sources=[source_slug(s) for s in args.validation_sources],
        smooth=args.smooth,
    )
    print(f"wrote {report}")
    return 0
