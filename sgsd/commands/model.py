"""`sgsd model`: prepare (convert and cache) an embedded model, or sample from a model for a quick look."""

NAME = "model"
HELP = "prepare an embedded model (convert + cache) or sample from a model"

DEFAULT_EMBEDDED = "embedded:qwen2.5-coder-0.5b"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    prepare = sub.add_parser("prepare", help="convert an embedded model once and print its cached folder")
    prepare.add_argument(
        "name", nargs="?", default=DEFAULT_EMBEDDED, help=f"embedded model name (default {DEFAULT_EMBEDDED})"
    )
    prepare.add_argument("--cache-dir", help="cache root (default $SGSD_CACHE or ~/.cache/sgsd)")

    generate = sub.add_parser("generate", help="sample completions for one prompt")
    generate.add_argument("name", help="embedded:NAME, a local model folder, or a hub id")
    generate.add_argument("prompt", help="the user message")
    generate.add_argument("--n", type=int, default=1, help="number of samples")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--top-k", type=int, default=0, help="0 disables")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--thinking", action="store_true", help="render the chat template with thinking on")
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    generate.add_argument("--adapter", help="a saved LoRA adapter folder to apply")
    generate.add_argument("--cache-dir", help="cache root for embedded models")


def run(args) -> int:
    if args.model_command == "prepare":
        from sgsd.models import prepare_embedded

        print(prepare_embedded(args.name, args.cache_dir))
        return 0

    from sgsd.generation import HFGenerator, sampling_params
    from sgsd.models import load_policy

    model, tokenizer = load_policy(
        args.name, dtype=args.dtype, cache_dir=args.cache_dir, adapter=args.adapter
    )
    params = sampling_params(args, n=args.n, seed=args.seed)  # --temperature, --top-p, --top-k, ...
    completions = HFGenerator(model, tokenizer).generate(
        [args.prompt], params, enable_thinking=args.thinking
    )[0]
    for index, completion in enumerate(completions):
        print(f"--- sample {index} ({completion.finish_reason}, {len(completion.token_ids)} tokens)")
        print(completion.text)
    return 0
