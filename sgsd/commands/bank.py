"""`sgsd bank`: build, merge, inspect and search skill banks; show the skill ledger.

sgsd bank build --source reasoning_gym:chain_sum --n 64 --out bank.json      (Alg. 2)
sgsd bank build --config paper/qwen3-1.7b/sgsd        (Alg. 2 with that config's settings, to skills.bank)
sgsd bank build --openai-base-url http://localhost:8000/v1 --openai-model M --out bank.json
sgsd bank merge bank.json --out merged.json                                   (Alg. 3)
sgsd bank show builtin:starter
sgsd bank search bank.json "What is 1/3 + 1/4?" --k 4
sgsd bank stats runs/sgsd-demo        (or a ledger.json)
"""

from __future__ import annotations

from pathlib import Path

NAME = "bank"
HELP = "build, merge, show and search skill banks; show the skill ledger of a run"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bank_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="cold-start a bank from seed problems (Alg. 2)",
        description="Alg. 2. Settings come from the flags, else from --config (see CONFIG_SETTINGS), else "
        "from the demo defaults.",
    )
    build.add_argument(
        "--config",
        "-c",
        help="a config (file or packaged name): seed problems, model, sampling and merge settings, and "
        "the output file (skills.bank) come from it; flags still override",
    )
    build.add_argument("--source", help="problem source (see sgsd.data); default reasoning_gym:chain_sum")
    build.add_argument("--n", type=int, help="seed problems (paper: 256)")
    build.add_argument("--seed", type=int, help="problem sampling seed (default 0)")
    build.add_argument("--out", help="bank file to write (default with --config: its skills.bank)")
    build.add_argument("--max-new-tokens", type=int, help="solution token budget (default 1024)")
    build.add_argument("--temperature", type=float, help="solution sampling temperature (default 1.0)")
    build.add_argument("--top-p", type=float, help="solution nucleus sampling (default 0.95)")
    build.add_argument(
        "--solve-thinking", action="store_true", default=None, help="thinking mode for the solutions"
    )
    _llm_arguments(build)

    merge = sub.add_parser("merge", help="merge a bank's collections again (Alg. 3)")
    merge.add_argument("file", help="bank JSON file")
    merge.add_argument("--out", required=True, help="merged bank file to write")
    _llm_arguments(merge)

    show = sub.add_parser("show", help="print a bank's entries")
    show.add_argument("file", help="bank JSON file or builtin:starter")

    search = sub.add_parser("search", help="retrieve the K skill-mistake pairs for a problem (Eqs. 2, 6)")
    search.add_argument("file", help="bank JSON file or builtin:starter")
    search.add_argument("question", help="problem text")
    search.add_argument("--k", type=int, default=8, help="pairs to retrieve (paper: 8)")
    search.add_argument("--embedder", default="embedded:all-MiniLM-L6-v2", help="embedder name or hub id")
    search.add_argument("--query-instruction", default="", help="prefix for the query only")
    search.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the weights")

    stats = sub.add_parser("stats", help="show a skill ledger (a ledger JSON file or a run folder)")
    stats.add_argument("path", help="ledger.json, or a run folder (its latest checkpoint's ledger)")
    stats.add_argument("--top", type=int, default=30, help="rows to show (most retrieved first)")


def _llm_arguments(p):
    p.add_argument("--model", help="policy used for the calls (default embedded:qwen2.5-coder-0.5b)")
    p.add_argument("--dtype", help="model dtype (default auto)")
    p.add_argument("--openai-base-url", help="use an OpenAI-compatible endpoint instead of --model")
    p.add_argument("--openai-model", help="model name at the endpoint")
    p.add_argument("--extract-max-new-tokens", type=int, help="token budget per extraction/merge call (2048)")
    p.add_argument(
        "--thinking", action="store_true", default=None, help="thinking mode for extraction/merge calls"
    )
    p.add_argument("--group-size", type=int, help="merge group size H (default 32)")
    p.add_argument("--patience", type=int, help="merge stagnation patience P (default 3)")
    p.add_argument(
        "--group-by-similarity",
        action="store_true",
        default=None,
        help="form merge groups by embedding similarity",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generator call")


# argument -> its default without --config
DEMO_SETTINGS = {
    "source": "reasoning_gym:chain_sum",
    "n": 256,
    "seed": 0,
    "out": None,
    "max_new_tokens": 1024,
    "temperature": 1.0,
    "top_p": 0.95,
    "solve_thinking": False,
    "model": "embedded:qwen2.5-coder-0.5b",
    "dtype": "auto",
    "extract_max_new_tokens": 2048,
    "thinking": False,
    "group_size": 32,
    "patience": 3,
    "group_by_similarity": False,
}
# argument -> the config key it is read from with --config (Alg. 2 and Alg. 3 settings of that run)
CONFIG_SETTINGS = {
    "source": "data.train_source",
    "n": "skills.cold_start_problems",
    "seed": "data.seed",
    "out": "skills.bank",
    "max_new_tokens": "skills.cold_start_max_new_tokens",
    "temperature": "skills.cold_start_temperature",
    "top_p": "skills.cold_start_top_p",
    "solve_thinking": "skills.cold_start_enable_thinking",
    "model": "model.name",
    "dtype": "model.dtype",
    "extract_max_new_tokens": "skills.extractor_max_new_tokens",
    "thinking": "skills.extractor_enable_thinking",
    "group_size": "skills.merge_group_size",
    "patience": "skills.merge_patience",
    "group_by_similarity": "skills.merge_group_by_similarity",
}


def resolve_settings(args):
    """Fill every setting the command line left unset (None): from `--config` (CONFIG_SETTINGS) when
    given, else from DEMO_SETTINGS. Returns `args`, changed in place."""
    cfg = None
    if getattr(args, "config", None):
        from sgsd.config import load_config
        from sgsd.configs import resolve_config_path

        cfg = load_config(resolve_config_path(args.config))
    for name, default in DEMO_SETTINGS.items():
        if getattr(args, name, default) is not None or not hasattr(args, name):
            continue
        if cfg is not None:
            section, key = CONFIG_SETTINGS[name].split(".")
            setattr(args, name, getattr(getattr(cfg, section), key))
        else:
            setattr(args, name, default)
    return args


def run(args) -> int:
    return {"build": _build, "merge": _merge, "show": _show, "search": _search, "stats": _stats}[
        args.bank_command
    ](args)


# ---------------------------------------------------------------------------- helpers (patched in tests)


def _make_generator(args):
    from sgsd.errors import UserError

    if args.openai_base_url:
        if not args.openai_model:
            raise UserError("--openai-base-url needs --openai-model")
        from sgsd.generation import OpenAIChatGenerator

        return OpenAIChatGenerator(model=args.openai_model, base_url=args.openai_base_url)
    from sgsd.generation import HFGenerator
    from sgsd.models import load_policy

    model, tokenizer = load_policy(args.model, dtype=args.dtype)
    model.eval()
    return HFGenerator(model, tokenizer, batch_size=args.batch_size)


def _load_problems(args):
    from sgsd.data import load_problems

    return load_problems(args.source, size=args.n, seed=args.seed)


def _grader():
    from functools import partial

    from sgsd.verifier import grade_many

    return partial(grade_many, timeout_s=5.0, workers=2)


def _sampling(**kw):
    from sgsd.generation import SamplingParams

    return SamplingParams(**kw)


def _group_embedder(args):
    if not args.group_by_similarity:
        return None
    from sgsd.skills.retrieval import Embedder

    return Embedder()


def _check_out(path: str) -> Path:
    from sgsd.errors import UserError

    out = Path(path)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'bank.json'}")
    return out


# ---------------------------------------------------------------------------- actions


def _build(args) -> int:
    from sgsd.errors import UserError
    from sgsd.fileio import atomic_write_json
    from sgsd.skills.build import cold_start

    resolve_settings(args)
    if args.out is None:
        raise UserError("give --out FILE (or --config, whose skills.bank names the file)")
    if args.out.startswith("builtin:"):
        raise UserError(f"the config's skills.bank is {args.out}, not a file; give --out FILE")
    out = _check_out(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = _load_problems(args)
    generator = _make_generator(args)
    bank, report = cold_start(
        problems,
        generator,
        _grader(),
        solve_params=_sampling(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        ),
        solve_thinking=args.solve_thinking,
        extract_params=_sampling(
            temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=args.extract_max_new_tokens
        ),
        group_size=args.group_size,
        patience=args.patience,
        extract_thinking=args.thinking,
        group_embedder=_group_embedder(args),
        batch_size=args.batch_size,
        source=args.source,
    )
    bank.save(out)
    report_path = out.with_suffix(".report.json")
    atomic_write_json(report_path, report.__dict__)
    print(report.summary())
    print(
        f"wrote {out} ({len(bank.general_skills)} skills, {len(bank.common_mistakes)} mistakes); report {report_path}"
    )
    if not len(bank):
        print("warning: the bank is empty: no model output could be used (see the parse failures above)")
    return 0


def _merge(args) -> int:
    from sgsd.skills.bank import load_bank
    from sgsd.skills.llm import MISTAKE, SKILL
    from sgsd.skills.merge import assign_ids, hierarchical_merge
    from sgsd.skills.parse import ParseStats

    resolve_settings(args)
    out = _check_out(args.out)
    bank = load_bank(args.file)
    generator = _make_generator(args)
    params = _sampling(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=args.extract_max_new_tokens)
    stats = ParseStats()
    merged, layers = {}, {}
    for kind, entries in ((SKILL, bank.general_skills), (MISTAKE, bank.common_mistakes)):
        result = hierarchical_merge(
            [e.content() for e in entries],
            kind,
            generator,
            params,
            group_size=args.group_size,
            patience=args.patience,
            stats=stats,
            enable_thinking=args.thinking,
            group_embedder=_group_embedder(args),
            batch_size=args.batch_size,
            progress=True,
        )
        merged[kind.name] = assign_ids(result.items, kind, kind.static_prefix)
        layers[kind.name] = result.metadata()
    metadata = dict(
        bank.metadata,
        source=f"hierarchical merge of {args.file}",
        merge_group_size=args.group_size,
        merge_stagnation_patience=args.patience,
        merge_layers=layers,
    )
    type(bank)(merged["skill"], merged["mistake"], metadata).save(out)
    print(f"merge calls: {stats.summary()}")
    print(
        f"{len(bank.general_skills)} -> {len(merged['skill'])} skills, "
        f"{len(bank.common_mistakes)} -> {len(merged['mistake'])} mistakes; wrote {out}"
    )
    return 0


def _show(args) -> int:
    from sgsd.skills.bank import load_bank

    bank = load_bank(args.file)
    print(
        f"{args.file}: {len(bank.general_skills)} general skills ({len(bank.dynamic_skills)} dynamic), "
        f"{len(bank.common_mistakes)} common mistakes ({len(bank.dynamic_mistakes)} dynamic); "
        f"fingerprint {bank.fingerprint()}"
    )
    if bank.metadata.get("source"):
        print(f"source: {bank.metadata['source']}")
    print("\n## General skills")
    for s in bank.general_skills:
        print(f"- [{s.skill_id}] {s.title}: {s.principle}\n    apply when: {s.when_to_apply}")
    print("\n## Common mistakes")
    for m in bank.common_mistakes:
        print(
            f"- [{m.mistake_id}] {m.description}\n    why: {m.why_it_happens}\n    instead: {m.how_to_avoid}"
        )
    return 0


def _search(args) -> int:
    from sgsd.errors import UserError
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import Embedder, Retriever

    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    bank = load_bank(args.file)
    embedder = Embedder(args.embedder, query_instruction=args.query_instruction)
    pairs = Retriever(bank, embedder, top_k=args.k, weight_temperature=args.temperature).retrieve(
        args.question
    )
    if not pairs:
        print("no pairs: the bank needs at least one general skill and one common mistake")
        return 0
    print(f"{'k':>2}  {'alpha':>6}  {'score':>6}  {'s_g':>6}  {'s_e':>6}  skill / mistake")
    for k, p in enumerate(pairs, start=1):
        print(
            f"{k:>2}  {p.weight:6.3f}  {p.score:6.3f}  {p.skill_score:6.3f}  {p.mistake_score:6.3f}  "
            f"[{p.skill.skill_id}] {p.skill.title}"
        )
        print(f"{'':>34}[{p.mistake.mistake_id}] {p.mistake.description}")
    return 0


def find_ledger(path: str | Path) -> Path:
    """A ledger file, or the ledger of a run folder's latest checkpoint."""
    from sgsd.errors import DataError

    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"no such ledger file or run folder: {path}")
    for name in ("ledger.json", "skill_ledger.json"):
        if (path / name).is_file():
            return path / name
    ckpts = path / "checkpoints"
    latest = ckpts / "latest"
    candidates = []
    if latest.is_file():
        candidates.append(ckpts / latest.read_text().strip() / "ledger.json")
    candidates += sorted(ckpts.glob("step-*/ledger.json"), reverse=True)
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{path}: no ledger.json in the folder or in its checkpoints")


def _stats(args) -> int:
    from sgsd.skills.ledger import SkillLedger

    ledger_path = find_ledger(args.path)
    ledger = SkillLedger.load(ledger_path)
    rows = ledger.table()
    print(
        f"{ledger_path}: {len(rows)} entries, {ledger.records} teacher outcomes (eps_a = {ledger.threshold})"
    )
    header = [
        "entry",
        "retrieved",
        "mean_support",
        "helpful",
        "warning",
        "misleading",
        "over_suppressive",
        "neutral",
        "evidence",
    ]
    short = ["entry", "retr", "support", "help", "warn", "mislead", "oversupp", "neutral", "evidence"]
    print("  ".join(f"{h:>18}" if i == 0 else f"{h:>8}" for i, h in enumerate(short)))
    for row in rows[: args.top]:
        cells = [f"{row['entry']:>18}"] + [
            f"{row[h]:8.3f}" if isinstance(row[h], float) else f"{row[h]:>8}" for h in header[1:]
        ]
        print("  ".join(cells) + f"  {row['text'][:60]}")
    if len(rows) > args.top:
        print(f"... {len(rows) - args.top} more (--top)")
    return 0
