"""Evaluation: avg@k, unbiased pass@k and maj@k over held-out problems, and checkpoint sweeps.

For every problem we draw k samples (paper: k=12, T=1.0, top-p 0.95, no top-k,
a long token budget, thinking on) and grade each one with the project's single
verifier. With n = k samples of which c are correct:

    avg@k   = c / n                                  (mean correctness over all samples)
    pass@k' = 1 - C(n - c, k') / C(n, k')            (unbiased; k' <= n; pass@1 == avg@k)
    maj@k   = 1 if the majority answer is correct

and each metric is averaged over problems.

Majority vote (maj@k). Samples without an extracted answer do not vote. The
other answers are first keyed by a normalised string (`normalize_answer`), then
distinct keys are merged greedily in order of first appearance: a key joins the
first earlier group whose representative (its first key) the verifier judges
equivalent, otherwise it opens a new group. The largest group wins; a tie goes
to the group whose first sample came earliest. The vote is correct when the
winning group's first sample is correct. No votes at all count as incorrect.

Resume. Each problem's record is appended to the JSONL file as soon as its
samples are graded; a rerun skips problems already there (a torn last line is
ignored), so an interrupted evaluation continues where it stopped.

Checkpoint sweeps (`evaluate_run`) evaluate the base model as step 0 and every
`RUN/checkpoints/step-N/adapter`, write `RUN/eval/step-N/{SOURCE.jsonl,
summary.json}`, and select checkpoints two ways, reported side by side:
the paper's protocol (best mean avg@k over the *test* sources, which selects
on the test set, see the paper's limitations) and held-out selection (best mean
avg@k over *validation* sources, reporting the test scores at that step).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sgsd.errors import DataError, UserError
from sgsd.fileio import append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl

STEP_DIR = re.compile(r"^step-(\d+)$")


def eval_seed(train_seed: int) -> int:
    """The sampling seed of held-out evaluations (in the loop and `sgsd eval`): train.seed + 17, so
    evaluation samples differ from rollout samples and a checkpoint sweep repeats the loop's draws."""
    return train_seed + 17


# ----------------------------------------------------------------------------
# Metrics (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms large binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s")


def normalize_answer(answer: str) -> str:
    """A string key for grouping answers: drops spacing, $ and \\left/\\right, unifies \\dfrac/\\tfrac,
    strips one trailing period and surrounding braces."""
    key = _LATEX_NOISE.sub("", answer)
    key = key.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    key = key.removesuffix(".")
    while key.startswith("{") and key.endswith("}") and _balanced(key[1:-1]):
        key = key[1:-1]
    return key


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[str, str], bool] | None = None,
) -> tuple[str | None, bool]:
    """Majority answer among samples and whether it is correct (rules in the module docstring).

    `equivalent(key_a, key_b)` compares two normalised keys (a is the later one); None means
    string equality of the keys only. Returns (winning answer as first written, its correctness).
    """
    groups: list[dict] = []  # each: rep key, first sample index, count
    group_of_key: dict[str, dict] = {}
    for i, answer in enumerate(answers):
        if answer is None or not answer.strip():
            continue
        key = normalize_answer(answer)
        group = group_of_key.get(key)
        if group is None:
            group = next((g for g in groups if equivalent and equivalent(key, g["rep"])), None)
            if group is None:
                group = {"rep": key, "first": i, "count": 0}
                groups.append(group)
            group_of_key[key] = group
        group["count"] += 1
    if not groups:
        return None, False
    winner = max(groups, key=lambda g: (g["count"], -g["first"]))
    return answers[winner["first"]], bool(correct[winner["first"]])


def distinct_answer_keys(answers: Sequence[str | None]) -> list[str]:
    """Normalised keys of the voting answers, in order of first appearance."""
    keys: list[str] = []
    for answer in answers:
        if answer is not None and answer.strip():
            key = normalize_answer(answer)
            if key not in keys:
                keys.append(key)
    return keys


def summarize_records(records: Sequence[dict], k: int) -> dict:
    """Aggregate per-problem records (as written to the JSONL) into the summary metrics."""
    if not records:
        raise DataError("no evaluated problems to summarise")
    n_samples = 0
    boxed = 0
    tokens = 0
    avg, maj = 0.0, 0.0
    curve = {kk: 0.0 for kk in range(1, k + 1)}
    for rec in records:
        samples = rec["samples"]
        n, c = len(samples), sum(bool(s["correct"]) for s in samples)
        if n < k:
            raise DataError(f"problem {rec['id']!r} has {n} samples but k={k}")
        avg += c / n
        for kk in curve:
            curve[kk] += pass_at_k(n, c, kk)
        maj += float(rec["maj_correct"])
        n_samples += n
        boxed += sum("\\boxed" in s["text"] for s in samples)
        tokens += sum(s["num_tokens"] for s in samples)
    m = len(records)
    return {
        "avg@k": avg / m,
        "pass@k": curve[k] / m,
        "maj@k": maj / m,
        "k": k,
        "n_problems": m,
        "boxed_rate": boxed / n_samples,
        "mean_tokens": tokens / n_samples,
        "pass_curve": {str(kk): v / m for kk, v in curve.items()},
    }


# ----------------------------------------------------------------------------
# Evaluating one problem set


def _default_grade_fn():
    from sgsd.verifier import grade_many

    return grade_many


def _student_prompt(question: str) -> str:
    from sgsd.prompts import student_prompt

    return student_prompt(question)


def skill_prompt_fn(retriever) -> Callable[[str], str]:
    """Base+Skill: a prompt function that puts the retrieved (skill, mistake) pairs in the prompt."""
    from sgsd.prompts import skills_in_prompt

    def prompt(question: str) -> str:
        pairs = retriever.retrieve(question)  # RetrievedPair objects or (skill, mistake) tuples
        return skills_in_prompt(question, [(p.skill, p.mistake) if hasattr(p, "skill") else p for p in pairs])

    return prompt


def _read_and_repair(path: Path) -> list[dict]:
    """Read a results JSONL; if its last line was cut by a kill, rewrite the file without it so that
    the next append starts on a fresh line."""
    text = path.read_text(encoding="utf-8")
    rows = read_jsonl(path)
    complete_lines = sum(1 for line in text.splitlines() if line.strip())
    if len(rows) != complete_lines or (text and not text.endswith("\n")):
        atomic_write_jsonl(path, rows)
    return rows


def _as_text(extracted) -> str | None:
    return None if extracted is None else str(extracted)


def _equivalence_table(keys_per_problem: list[list[str]], grade_fn) -> dict[tuple[str, str], bool]:
    """Verifier equivalence for every ordered pair (later, earlier) of distinct keys, in one batch."""
    pairs = sorted({(b, a) for keys in keys_per_problem for i, a in enumerate(keys) for b in keys[i + 1 :]})
    if not pairs:
        return {}
    results = grade_fn([(f"\\boxed{{{b}}}", a) for b, a in pairs])
    return {pair: bool(r.correct) for pair, r in zip(pairs, results, strict=True)}


def problems_per_call(batch_size: int, k: int) -> int:
    """Problems handed to the generator per call so that about `batch_size` sequences (problems x k
    samples) are generated at once; `sgsd eval` and the in-loop evaluation both chunk this way."""
    return max(1, batch_size // k)


def evaluate_problems(
    generator,
    problems: Sequence,
    k: int,
    params,
    enable_thinking: bool,
    out_jsonl: str | Path,
    prompt_fn: Callable[[str], str] | None = None,
    grade_fn: Callable | None = None,
    seed: int = 0,
    chunk_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Sample k completions per problem, grade them, append one record per problem to `out_jsonl`,
    and return the summary over all `problems` (`summarize_records`).

    `params` is a `SamplingParams`; its `n` is set to k and its seed to `seed + index of the chunk's
    first problem`. `prompt_fn(question) -> str` builds the user message (default: the student
    prompt; `skill_prompt_fn(retriever)` for Base+Skill). `grade_fn(pairs) -> results` grades
    (completion text, gold) pairs (default: `sgsd.verifier.grade_many`). Problems whose id is already
    in `out_jsonl` are not sampled again.
    """
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    prompt_fn = prompt_fn or _student_prompt
    grade_fn = grade_fn or _default_grade_fn()
    out_jsonl = Path(out_jsonl)
    ids = [str(p.id) for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"problem ids must be unique; {dup!r} appears more than once")

    done: dict[str, dict] = {}
    if out_jsonl.exists():
        for rec in _read_and_repair(out_jsonl):
            if len(rec.get("samples", [])) != k:
                raise DataError(
                    f"{out_jsonl}: problem {rec.get('id')!r} has {len(rec.get('samples', []))} samples, "
                    f"not k={k}; use another output folder or delete the file"
                )
            done[str(rec["id"])] = rec
    todo = [(i, p) for i, p in enumerate(problems) if str(p.id) not in done]

    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        prompts = [prompt_fn(p.question) for _, p in chunk]
        conversations = [[{"role": "user", "content": text}] for text in prompts]
        chunk_params = dataclasses.replace(params, n=k, seed=seed + chunk[0][0])
        outputs = generator.generate(conversations, chunk_params, enable_thinking=enable_thinking)
        if len(outputs) != len(chunk) or any(len(o) != k for o in outputs):
            raise DataError(f"the generator returned {[len(o) for o in outputs]} samples, expected {k} each")
        grades = grade_fn(
            [(c.text, str(p.answer)) for (_, p), comps in zip(chunk, outputs, strict=True) for c in comps]
        )
        answers = [[_as_text(g.extracted) for g in grades[j * k : (j + 1) * k]] for j in range(len(chunk))]
        same = _equivalence_table([distinct_answer_keys(a) for a in answers], grade_fn)

        def same_answer(later: str, earlier: str, same=same) -> bool:
            return same.get((later, earlier), False)

        for j, ((_, problem), comps) in enumerate(zip(chunk, outputs, strict=True)):
            graded = grades[j * k : (j + 1) * k]
            maj_answer, maj_correct = majority_vote(answers[j], [g.correct for g in graded], same_answer)
            record = {
                "id": str(problem.id),
                "question": problem.question,
                "gold": str(problem.answer),
                "prompt": prompts[j],
                "maj_answer": maj_answer,
                "maj_correct": maj_correct,
                "samples": [
                    {
                        "text": c.text,
                        "extracted": _as_text(g.extracted),
                        "correct": bool(g.correct),
                        "finish_reason": c.finish_reason,
                        "num_tokens": len(c.token_ids),
                    }
                    for c, g in zip(comps, graded, strict=True)
                ],
            }
            append_jsonl(out_jsonl, record)
            done[record["id"]] = record
        if progress:
            progress(len(done), len(problems))
    return summarize_records([done[i] for i in ids], k)


def evaluate_sources(
    generator,
    eval_sets: dict[str, Sequence],
    out_dir: str | Path,
    params,
    enable_thinking: bool,
    seed: int = 0,
    retriever=None,
    verifier_timeout_s: float = 5.0,
    verifier_workers: int = 2,
    verifier_extraction: str = "boxed",
    step: int | None = None,
    checkpoint: str | None = None,
    grade_fn: Callable | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Evaluate the generator's current weights on several sources (the trainer's in-loop evaluation):
    writes `out_dir/SOURCE.jsonl` per source and `out_dir/summary.json`
    ({"step", "checkpoint", "results": {slug: metrics}}), and returns the summary. `params` are the
    SamplingParams (`params.n` = k samples per problem; e.g. `sgsd.generation.sampling_params(cfg.eval,
    n=cfg.eval.k)`). About `batch_size` sequences (problems x k) are generated at once, also by a
    generator built with another batch size (the trainer's rollout generator, `rollout.batch_size`;
    `sgsd.generation.rows_per_batch`); a progress bar counts problems. Without `grade_fn`, samples are
    graded by `sgsd.verifier.grade_many` with the verifier_* settings (`verifier_extraction`: "boxed" or "free", the config's `verifier.extraction`)."""
    from functools import partial

    from tqdm.auto import tqdm

    from sgsd.generation import rows_per_batch

    if grade_fn is None:
        from sgsd.verifier import grade_many

        grade_fn = partial(
            grade_many, timeout_s=verifier_timeout_s, workers=verifier_workers, extraction=verifier_extraction
        )
    k = params.n
    prompt_fn = skill_prompt_fn(retriever) if retriever is not None else None
    out_dir = Path(out_dir)
    results = {}
    for name, problems in eval_sets.items():
        with (
            tqdm(total=len(problems), desc=f"eval {source_slug(name)}", disable=not show_progress) as bar,
            rows_per_batch(generator, batch_size),
        ):

            def progress(done: int, total: int, bar=bar) -> None:
                bar.update(done - bar.n)

            results[source_slug(name)] = evaluate_problems(
                generator,
                problems,
                k,
                params,
                enable_thinking,
                out_dir / f"{source_slug(name)}.jsonl",
                prompt_fn=prompt_fn,
                grade_fn=grade_fn,
                seed=seed,
                chunk_size=problems_per_call(batch_size, k),
                progress=progress,
            )
    summary = {
        "step": step,
        "checkpoint": checkpoint or ("base" if step == 0 else "live"),
        "results": results,
        **(extra or {}),  # e.g. the trainer's train_time_s, for accuracy-against-time plots
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def evaluate_during_training(
    cfg,
    generator,
    eval_sets: dict[str, Sequence],
    out_dir: str | Path,
    step: int,
    retriever=None,
    train_time_s=0.0,
    validation_sets: dict[str, Sequence] | None = None,
    extra: dict | None = None,
) -> dict:
    """The trainer's held-out evaluation with the config's settings (`eval.*`, `verifier.*`, the eval
    seed of `eval_seed`); the summary carries `train_time_s` (and `extra`, e.g. the training CPU-seconds)
    for accuracy-against-time plots. `validation_sets` (the validation split, `sgsd.data.validation_sets`)
    are evaluated first into `out_dir/validation/` and their metrics go in the summary under
    "validation", apart from the test sources' "results"."""
    from sgsd.generation import sampling_params

    e, v = cfg.eval, cfg.verifier
    common = dict(
        params=sampling_params(e, n=e.k),
        enable_thinking=e.enable_thinking,
        seed=eval_seed(cfg.train.seed),
        retriever=retriever,
        verifier_timeout_s=v.timeout_s,
        verifier_workers=v.workers,
        verifier_extraction=v.extraction,
        step=step,
        batch_size=e.batch_size,
        show_progress=cfg.train.progress,
    )
    extra = {"train_time_s": round(train_time_s, 3), **(extra or {})}
    if validation_sets:
        val = evaluate_sources(generator, validation_sets, out_dir=Path(out_dir) / "validation", **common)
        extra["validation"] = val["results"]
    return evaluate_sources(generator, eval_sets, out_dir=out_dir, extra=extra, **common)


# ----------------------------------------------------------------------------
# Checkpoint sweeps over a run folder


def source_slug(source: str) -> str:
    """A filesystem-safe name for a data source: hf:aime24 -> aime24,
    reasoning_gym:chain_sum -> reasoning_gym-chain_sum, /data/my set.jsonl -> my_set."""
    if "/" in source or Path(source).suffix in {".jsonl", ".json", ".parquet", ".csv"}:
        source = Path(source).stem
    source = source.removeprefix("hf:")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.replace(" ", "_")).strip("-.")
    return slug or "source"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> adapter folder for every `RUN/checkpoints/step-N/adapter` (sorted by step)."""
    found = {}
    ckpt_root = Path(run_dir) / "checkpoints"
    if ckpt_root.is_dir():
        for child in ckpt_root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / "adapter" / "adapter_config.json").is_file():
                found[int(match.group(1))] = child / "adapter"
    return dict(sorted(found.items()))


def read_summaries(eval_dir: str | Path) -> dict[int, dict]:
    """step -> summary.json contents for every `EVAL/step-N/summary.json` (sorted by step)."""
    import json

    found = {}
    eval_dir = Path(eval_dir)
    if eval_dir.is_dir():
        for child in eval_dir.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / "summary.json").is_file():
                try:
                    found[int(match.group(1))] = json.loads((child / "summary.json").read_text("utf-8"))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{child / 'summary.json'}: not valid JSON ({exc.msg})") from exc
    return dict(sorted(found.items()))


def _mean_avg(summary: dict, sources: Sequence[str]) -> float | None:
    results = summary.get("results", {})
    if not sources or any(s not in results for s in sources):
        return None
    return sum(results[s]["avg@k"] for s in sources) / len(sources)


def select_checkpoints(
    summaries: dict[int, dict],
    test_sources: Sequence[str],
    validation_sources: Sequence[str] = (),
    include_base: bool = False,
) -> dict:
    """Choose checkpoints from per-step summaries (source names are slugs).

    `best_on_test`: the step with the highest mean avg@k over `test_sources` (the paper's protocol);
    `validation`: the step with the highest mean avg@k over `validation_sources`, with the test scores
    at that step (None without validation sources). Ties go to the earliest step. Step 0 (the base
    model) is a candidate only when `include_base` or when it is the only step.
    """
    candidates = {s: v for s, v in summaries.items() if include_base or s != 0} or dict(summaries)

    def pick(sources):
        scored = [
            (score, -step, step)
            for step, v in candidates.items()
            if (score := _mean_avg(v, sources)) is not None
        ]
        if not scored:
            return None
        _, _, step = max(scored)
        results = candidates[step]["results"]
        return {
            "step": step,
            "selected_by": list(sources),
            "test": {s: results[s]["avg@k"] if s in results else None for s in test_sources},
            "test_mean": _mean_avg(candidates[step], test_sources),
            "selection_score": _mean_avg(candidates[step], sources),
        }

    return {
        "best_on_test": pick(test_sources),
        "validation": pick(validation_sources) if validation_sources else None,
    }


def evaluate_run(
    run_dir: str | Path,
    sources: dict[str, Sequence],
    generator_factory: Callable[[Path | None], Any],
    k: int,
    params,
    enable_thinking: bool,
    validation_sources: Sequence[str] = (),
    steps: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    prompt_fn: Callable[[str], str] | None = None,
    grade_fn: Callable | None = None,
    seed: int = 0,
    chunk_size: int = 8,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate the base model (step 0) and each checkpoint of a run, then select checkpoints.

    `sources` maps a source name to its problems (test and validation sources together; names in
    `validation_sources` are used only for held-out selection). `generator_factory(adapter_dir)`
    returns a generator for the base model (None) or an adapter. `steps` restricts the sweep (None:
    all). Results go to `out_dir` (default `RUN/eval`) as `step-N/SOURCE.jsonl` and
    `step-N/summary.json`; the selection is written to `selection.json` and returned together with
    every step's summary.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "eval"
    ckpts: dict[int, Path | None] = {0: None, **list_checkpoints(run_dir)}
    if steps is not None:
        missing = [s for s in steps if s not in ckpts]
        if missing:
            raise UserError(f"{run_dir}: no checkpoint for step(s) {missing}; found {sorted(ckpts)}")
        ckpts = {s: ckpts[s] for s in sorted(set(steps))}
    slugs = {source_slug(name): name for name in sources}
    for step, adapter in ckpts.items():
        step_out = out_dir / step_dir_name(step)
        generator = generator_factory(adapter)
        results = {}
        for slug, name in slugs.items():
            log(f"step {step}: {name} ({len(sources[name])} problems, k={k})")
            results[slug] = evaluate_problems(
                generator, sources[name], k, params, enable_thinking, step_out / f"{slug}.jsonl",
                prompt_fn=prompt_fn, grade_fn=grade_fn, seed=seed, chunk_size=chunk_size,
            )  # fmt: skip
        before = read_summaries(out_dir).get(step, {})  # keep other sources' results and the rest
        summary = {
            **before,
            "step": step,
            "checkpoint": str(adapter) if adapter else "base",
            "results": {**before.get("results", {}), **results},
        }
        atomic_write_json(step_out / "summary.json", summary)
        del generator
    summaries = read_summaries(out_dir)
    val_slugs = [source_slug(s) for s in validation_sources]
    test_slugs = [s for s in slugs if s not in val_slugs]
    selection = select_checkpoints(summaries, test_slugs, val_slugs)
    atomic_write_json(out_dir / "selection.json", selection)
    return {"summaries": summaries, "selection": selection}
