"""`sgsd eval`: avg@k / pass@k / maj@k of a model, an adapter, or every checkpoint of a run.

    sgsd eval --config configs/demo.yaml                       # the configured model
    sgsd eval --config configs/demo.yaml --adapter runs/x/checkpoints/step-000050/adapter --out results/x50
    sgsd eval --run runs/x [--checkpoints all|best|0,25,50] [--validation-sources hf:math500]
    sgsd eval --config c.yaml data.validation_size=64 --split validation   # the validation split instead

With --run the run's own config.yaml is used unless --config is given, results go to RUN/eval
(step-N/SOURCE.jsonl, step-N/summary.json, selection.json), and `best` re-evaluates the checkpoint
that the existing summaries rank first on the test sources. Interrupted evaluations resume.
"""

from __future__ import annotations

NAME = "eval"
HELP = "evaluate a model, an adapter or a run's checkpoints (avg@k, pass@k, maj@k); resumes if interrupted"


def add_arguments(parser):
    parser.add_argument(
        "--config", "-c", help="YAML file or packaged config name (default with --run: RUN/config.yaml)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_new_tokens=512")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--adapter", help="a saved LoRA adapter folder to evaluate on top of model.name")
    target.add_argument("--run", help="a run folder: evaluate the base model (step 0) and its checkpoints")
    parser.add_argument(
        "--checkpoints",
        default="all",
        help="with --run: all, best, or comma-separated steps (0 = base model)",
    )
    parser.add_argument("--sources", nargs="+", help="evaluation sources (default: data.eval_sources)")
    parser.add_argument(
        "--validation-sources",
        nargs="+",
        default=[],
        help="held-out sources used only to select a checkpoint",
    )
    parser.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="the sources' test problems (default), or their validation split (data.validation_size)",
    )
    parser.add_argument("--k", type=int, help="samples per problem (default: eval.k)")
    parser.add_argument(
        "--with-skills", action="store_true", help="Base+Skill: retrieved skills in the prompt"
    )
    parser.add_argument("--out", help="output folder (default: RUN/eval with --run, else runs/eval/<model>)")


def run(args) -> int:
    import time
    from functools import partial
    from pathlib import Path

    from sgsd.config import load_config
    from sgsd.errors import UserError
    from sgsd.evaluate import evaluate_problems, evaluate_run, source_slug
    from sgsd.fileio import atomic_write_json

    started = time.perf_counter()
    run_dir = Path(args.run) if args.run else None
    if run_dir is not None and not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    from sgsd.configs import resolve_config_path

    config_path = resolve_config_path(args.config) or (  # a file or a packaged name, as for train
        run_dir / "config.yaml" if run_dir and (run_dir / "config.yaml").is_file() else None
    )
    overrides = list(args.overrides) + (["eval.with_skills=true"] if args.with_skills else [])
    cfg = load_config(config_path, overrides)
    k = args.k if args.k is not None else cfg.eval.k
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")

    if run_dir is None and args.checkpoints != "all":
        raise UserError("--checkpoints needs --run RUN_DIR")
    if args.split == "validation" and (run_dir is not None or not cfg.data.validation_size):
        raise UserError("--split validation needs data.validation_size and evaluates a model, not a --run")
    test_sources = args.sources or cfg.data.eval_sources
    out = Path(args.out) if args.out else None
    steps = None
    if run_dir is not None:
        out = out or run_dir / "eval"
        steps = _parse_checkpoints(args.checkpoints, out, [source_slug(s) for s in test_sources])

    from sgsd.data import held_out_sets, validation_sets
    from sgsd.evaluate import eval_seed, problems_per_call
    from sgsd.generation import sampling_params
    from sgsd.verifier import grade_many

    all_sources = list(dict.fromkeys([*test_sources, *args.validation_sources]))
    problems = held_out_sets(cfg.data, all_sources)  # the run's own held-out problems (as in the loop)
    if args.split == "validation":  # the split the loop evaluates as "validation", apart from these
        problems = validation_sets(cfg.data, problems)
    params = sampling_params(cfg.eval, n=k)
    grade_fn = partial(
        grade_many,
        timeout_s=cfg.verifier.timeout_s,
        workers=cfg.verifier.workers,
        extraction=cfg.verifier.extraction,
    )
    prompt_fn = _skill_prompt_fn(cfg) if cfg.eval.with_skills else None
    factory = _generator_factory(cfg)
    chunk_size = problems_per_call(cfg.eval.batch_size, k)  # as the in-loop evaluation samples
    common = dict(
        prompt_fn=prompt_fn, grade_fn=grade_fn, seed=eval_seed(cfg.train.seed), chunk_size=chunk_size
    )

    if run_dir is None:
        out = out or Path("runs") / "eval" / source_slug(cfg.model.name)
        generator = factory(Path(args.adapter) if args.adapter else None)
        results = {}
        for name, probs in problems.items():
            print(f"{name}: {len(probs)} problems, k={k}", flush=True)
            results[source_slug(name)] = evaluate_problems(
                generator,
                probs,
                k,
                params,
                cfg.eval.enable_thinking,
                out / f"{source_slug(name)}.jsonl",
                **common,
            )
        factory.close()
        summary = {"step": None, "checkpoint": args.adapter or cfg.model.name, "results": results}
        atomic_write_json(out / "summary.json", summary)
        _print_table({"-": summary})
        print(f"wrote {out}/summary.json")
        return 0

    result = evaluate_run(
        run_dir, problems, factory, k, params, cfg.eval.enable_thinking,
        validation_sources=args.validation_sources, steps=steps, out_dir=out, **common,
    )  # fmt: skip
    factory.close()
    _print_table(result["summaries"])
    sel = result["selection"]
    best = sel["best_on_test"]
    if best:
        print(f"best on the test sources: step {best['step']} (mean avg@k {best['test_mean']:.3f})")
    if sel["validation"]:
        v = sel["validation"]
        print(f"chosen on validation: step {v['step']} (test mean avg@k {v['test_mean']:.3f})")
    print(f"wrote {out}/selection.json")
    if out == run_dir / "eval":  # the run's own results: the closing summary reads them from the folder
        from sgsd.summary import format_summary, run_summary

        print(format_summary(run_summary(run_dir, wall_s=time.perf_counter() - started), "sgsd eval"))
    return 0


def _parse_checkpoints(spec: str, out_dir, test_slugs: list[str]) -> list[int] | None:
    from sgsd.errors import UserError
    from sgsd.evaluate import read_summaries, select_checkpoints

    if spec == "all":
        return None
    if spec == "best":
        chosen = select_checkpoints(read_summaries(out_dir), test_slugs)["best_on_test"]
        if chosen is None:
            raise UserError(f"--checkpoints best needs earlier results for {test_slugs} in {out_dir}")
        return [chosen["step"]]
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as exc:
        raise UserError(f"--checkpoints must be all, best or comma-separated steps, got {spec!r}") from exc


def _generator_factory(cfg):
    """adapter folder (or None for the base model) -> generator. hf reloads the model per checkpoint;
    vllm keeps one engine and swaps the LoRA adapter; vllm_server loads each adapter into the server at
    rollout.vllm_server_url (unloading the previous one) or samples its base model."""
    from sgsd.generation import make_generator
    from sgsd.models import load_policy, resolve_model_path

    state = {}

    def factory(adapter):
        if cfg.eval.backend == "vllm_server":
            return _server_generator(cfg, state, adapter)
        if cfg.eval.backend == "vllm":
            if "vllm" not in state:
                from transformers import AutoTokenizer

                path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
                state["vllm"] = make_generator(
                    "vllm", model_path=path, tokenizer=AutoTokenizer.from_pretrained(path),
                    max_lora_rank=max(cfg.model.lora_rank, 1),
                    gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                )  # fmt: skip
            state["vllm"].sync_adapter(adapter)  # None: back to the base model
            return state["vllm"]
        state.pop("hf", None)  # free the previous checkpoint's model first
        model, tokenizer = load_policy(
            cfg.model.name, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir,
            attn_implementation=cfg.model.attn_implementation, adapter=adapter,
        )  # fmt: skip
        model.eval()
        state["hf"] = make_generator(  # sampled as in the loop: merged LoRA copy (rollout.merged_generation)
            "hf", model=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
            merged=cfg.rollout.merged_generation, prune_finished=cfg.rollout.prune_finished, progress=True,
        )  # fmt: skip
        return state["hf"]

    def close():  # vllm_server: leave no adapter of this evaluation loaded in the server
        if "server" in state:
            state["server"].unload()

    factory.close = close
    return factory


def _server_generator(cfg, state: dict, adapter):
    """The vllm_server generator (one client for the whole sweep) set to sample with `adapter` (a folder,
    loaded under a name derived from its absolute path) or with the base model (None)."""
    import hashlib
    from pathlib import Path

    from sgsd.generation import make_generator
    from sgsd.models import resolve_model_path

    if "server" not in state:
        from transformers import AutoTokenizer

        r = cfg.rollout
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name, cfg.model.cache_dir))
        state["server"] = make_generator(
            "vllm_server", base_url=r.vllm_server_url, tokenizer=tokenizer, timeout_s=r.vllm_server_timeout_s
        )
        state["server"].check()
    server = state["server"]
    if adapter is None:
        server.use_base()
    else:
        path = Path(adapter).resolve()
        server.load_adapter(f"sgsd-eval-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}", path)
    return server


def _skill_prompt_fn(cfg):
    from sgsd.config import retrieval_top_k
    from sgsd.evaluate import skill_prompt_fn
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import Embedder, Retriever

    retriever = Retriever(
        load_bank(cfg.skills.bank),
        Embedder(cfg.skills.embedder, query_instruction=cfg.skills.query_instruction),
        top_k=retrieval_top_k(cfg),
        mode=cfg.skills.retrieval,
        weight_temperature=cfg.skills.weight_temperature,
    )
    return skill_prompt_fn(retriever)


def _print_table(summaries: dict) -> None:
    """One line per (step, source): avg@k, pass@k, maj@k, boxed rate and mean tokens."""
    print(
        f"{'step':>6}  {'source':<28} {'k':>3} {'n':>5} {'avg@k':>7} {'pass@k':>7} {'maj@k':>7} {'boxed':>6} {'tokens':>7}"
    )
    for step, summary in summaries.items():
        for source, r in summary["results"].items():
            print(
                f"{step!s:>6}  {source:<28} {r['k']:>3} {r['n_problems']:>5} {r['avg@k']:>7.3f} "
                f"{r['pass@k']:>7.3f} {r['maj@k']:>7.3f} {r['boxed_rate']:>6.2f} {r['mean_tokens']:>7.1f}"
            )
