"""`sgsd verify`: show how the verifier grades a completion, or a JSONL file of them."""

NAME = "verify"
HELP = "grade completions against gold answers and show the extracted answer, verdict and reason"


def add_arguments(parser):
    parser.add_argument("completion", nargs="?", help="completion text, a file holding it, or - for stdin")
    parser.add_argument("--gold", help="the reference answer (single-completion mode)")
    parser.add_argument("--jsonl", metavar="FILE", help="batch mode: a JSONL file of completions and golds")
    parser.add_argument("--completion-field", default="completion", help="JSONL field with the completion")
    parser.add_argument("--gold-field", default="gold", help="JSONL field with the gold answer")
    parser.add_argument("--out", metavar="FILE", help="batch mode: write verdicts here (default: stdout)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per item (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="grading processes; 0 = in this process")
    parser.add_argument(
        "--extraction",
        choices=("boxed", "free"),
        default="boxed",
        help="boxed: only a box or an answer marker counts (training's rule, default); free: also the "
        "last LaTeX or plain expression, several boxes as one answer, units and separators stripped",
    )
    parser.epilog = "Single mode exits 0 when the completion is correct and 1 when it is not."


def run(args) -> int:
    from sgsd.errors import UserError

    if args.jsonl:
        if args.completion is not None or args.gold is not None:
            raise UserError("--jsonl grades a file: do not also give a completion or --gold")
        return _run_batch(args)
    if args.completion is None or args.gold is None:
        raise UserError("give a completion (text, file or -) and --gold ANSWER, or --jsonl FILE")
    return _run_single(args)


def _read_completion(value: str) -> str:
    import sys
    from pathlib import Path

    from sgsd.errors import UserError

    if value == "-":
        return sys.stdin.read()
    path = Path(value)
    try:
        if len(value) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return value


def _run_single(args) -> int:
    from sgsd.verifier import grade_many

    completion = _read_completion(args.completion)
    (result,) = grade_many(
        [(completion, args.gold)], timeout_s=args.timeout, workers=args.workers, extraction=args.extraction
    )
    print(f"extracted: {_printable(result.extracted)}")
    print(f"verdict:   {'correct' if result.correct else 'incorrect'}")
    print(f"reason:    {result.reason}")
    return 0 if result.correct else 1


def _printable(text):
    return "(none)" if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _run_batch(args) -> int:
    import json
    import sys

    from sgsd.errors import DataError, UserError
    from sgsd.fileio import atomic_write_jsonl, read_jsonl
    from sgsd.verifier import grade_many

    try:
        rows = read_jsonl(args.jsonl, skip_torn_tail=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {args.jsonl}: {getattr(exc, 'strerror', None) or exc}") from exc
    pairs = []
    for line, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{args.jsonl}: record {line} is not a JSON object")
        for field in (args.completion_field, args.gold_field):
            if field not in row:
                raise DataError(f"{args.jsonl}: record {line} has no field {field!r}")
        completion, gold = row[args.completion_field], row[args.gold_field]
        if not isinstance(completion, str):
            raise DataError(f"{args.jsonl}: record {line}: {args.completion_field!r} must be text")
        if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
            raise DataError(f"{args.jsonl}: record {line}: {args.gold_field!r} must be text or a number")
        pairs.append((completion, gold))
    results = grade_many(pairs, timeout_s=args.timeout, workers=args.workers, extraction=args.extraction)
    verdicts = [
        {
            "index": i,
            "gold": _printable(gold) if isinstance(gold, str) else gold,
            "extracted": r.extracted,
            "correct": r.correct,
            "reason": r.reason,
        }
        for i, ((_, gold), r) in enumerate(zip(pairs, results, strict=True))
    ]
    if args.out:
        atomic_write_jsonl(args.out, verdicts)
    else:
        for v in verdicts:
            print(json.dumps(v))  # ASCII escapes: safe for any terminal and for U+FFFD
    correct = sum(r.correct for r in results)
    share = f" ({100 * correct / len(results):.1f}%)" if results else ""
    print(f"graded {len(results)}: {correct} correct{share}", file=sys.stderr)
    return 0
