"""The `dpokit` command: run, list, copy and print recipes and their configs; pack and validate data;
evaluate checkpoints.

Recipes are the `*.py` files of the `dpokit.recipes` folder; the configs of recipe R are the
`configs/R/*.yaml` files beside them. Both are found by scanning those folders, so adding a recipe
is adding a file. The CLI itself never parses a config: the recipe does.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import shutil
import sys
from pathlib import Path

import dpokit.recipes  # (the top-level recipes/ folder, mapped to dpokit.recipes by the build)

RECIPES_DIR = Path(dpokit.recipes.__file__).resolve().parent
CONFIGS_DIR = RECIPES_DIR / "configs"


class CliError(Exception):
    pass


def recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.py")) if not p.name.startswith("_")}


def configs(recipe: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((CONFIGS_DIR / recipe).glob("*.yaml"))}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_recipe(name: str) -> Path:
    """A packaged recipe name, or a path to a local `.py` recipe (e.g. one made by `dpokit cp`)."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise CliError(f"recipe file not found: {name}")
        return path
    available = recipes()
    if name not in available:
        raise CliError(f"unknown recipe {name!r}{_suggest(name, available)}; `dpokit ls` lists them")
    return available[name]


def resolve_config(recipe: Path, name: str) -> Path:
    """A path to a `.yaml` file, or the name of one of the recipe's packaged configs
    (`tiny`, or `recipe/tiny` to name another recipe's)."""
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise CliError(f"config file not found: {name}")
        return path
    recipe_name, _, config_name = name.rpartition("/")
    recipe_name = recipe_name or recipe.stem
    available = configs(recipe_name)
    if config_name not in available:
        listing = ", ".join(available) or "none"
        raise CliError(
            f"no config {config_name!r} for recipe {recipe_name!r}{_suggest(config_name, available)}; "
            f"its configs: {listing}"
        )
    return available[config_name]


def _split_config_name(name: str) -> tuple[str, str]:
    recipe_name, sep, config_name = name.partition("/")
    return recipe_name, config_name if sep else ""


def cmd_ls(args) -> int:
    for name in recipes():
        print(name)
        for config in configs(name):
            print(f"    {name}/{config}")
    return 0


def cmd_cat(args) -> int:
    recipe_name, config_name = _split_config_name(args.name)
    if not config_name:
        raise CliError(f"name a config as RECIPE/CONFIG, e.g. dpo_lora_single_device/tiny (got {args.name!r})")
    print(resolve_config(resolve_recipe(recipe_name), args.name).read_text(), end="")
    return 0


def cmd_cp(args) -> int:
    recipe_name, config_name = _split_config_name(args.name)
    source = resolve_config(resolve_recipe(recipe_name), args.name) if config_name else resolve_recipe(recipe_name)
    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / source.name
    if destination.exists() and not args.force:
        raise CliError(f"{destination} exists; pass --force to overwrite")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    print(f"copied {source.name} to {destination}")
    return 0


def cmd_run(args) -> int:
    """The recipe runs in worker processes this command owns (`dpokit.launch`): one without
    launcher options, `--nproc_per_node` per node with them."""
    from dpokit.launch import LaunchError, launch, topology

    recipe = resolve_recipe(args.recipe)
    config = resolve_config(recipe, args.config)
    recipe_args = [str(recipe), "--config", str(config), *args.overrides]
    distributed = [args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint]
    try:
        if any(value is not None for value in distributed):
            topo = topology(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint)
        else:
            topo = topology(1, None, None, None)
    except LaunchError as e:
        raise CliError(str(e)) from None
    return launch(recipe_args, topo, resume_command=shlex.join(["dpokit", *args.argv]))


def cmd_pack(args) -> int:
    """Offline packing: tokenize a preference file (or a Hub dataset's split), pack pairs, write the
    packs + their stats."""
    import importlib

    from dpokit.data import PreferenceDataset, pack_preference_dataset
    from dpokit.errors import DpokitError

    # Both positionals are optional in the parser so that `--hub REPO OUTPUT` parses; sorted out here.
    given = [value for value in (args.input, args.output) if value is not None]
    if args.hub is None and len(given) != 2:
        raise CliError("pack: give INPUT and OUTPUT (or --hub REPO and OUTPUT)")
    if args.hub is not None and len(given) != 1:
        raise CliError("pack: with --hub REPO give only OUTPUT (the Hub dataset is the input)")
    if args.hub is None and (args.split or args.subset or args.revision):
        raise CliError("pack: --split, --subset and --revision go with --hub REPO")
    source, output = (given[0], given[1]) if args.hub is None else (None, given[0])
    if args.pack_size < 2 * args.max_seq_len:
        raise CliError(f"--pack-size {args.pack_size} must be at least 2 x --max-seq-len ({2 * args.max_seq_len})")
    module_name, _, attr = args.tokenizer.rpartition(".")
    try:
        tokenizer = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError, ValueError) as e:
        raise CliError(f"cannot build tokenizer {args.tokenizer!r}: {e}") from None
    try:
        dataset = PreferenceDataset(
            source,
            tokenizer,
            max_seq_len=args.max_seq_len,
            format=args.format,
            skip_invalid=args.skip_invalid,
            hub=args.hub,
            split=args.split,
            subset=args.subset,
            revision=args.revision,
        )
        packed = pack_preference_dataset(
            dataset,
            pack_size=args.pack_size,
            algorithm=args.algorithm,
            prefix_sharing=args.prefix_sharing,
            seed=args.seed,
        )
    except DpokitError as e:
        raise CliError(e.message_with_fix("--skip-invalid" if e.fix_param == "skip_invalid" else None)) from None
    label = source if args.hub is None else str(dataset.path)  # str(files of a Hub split) names it
    path, stats_path = packed.save(
        output,
        source=label,
        tokenizer=args.tokenizer,
        max_seq_len=args.max_seq_len,
        dataset=dataset.stats.summary(),
    )
    print(f"{label}: {dataset.stats.summary()}")
    print(f"{packed.stats.summary()}\npacks: {path}\nstats: {stats_path}")
    return 0


def parse_key_names(values: list[str] | None) -> dict[str, str] | None:
    """["prompt=question,chosen=good", "rejected=bad"] -> {"prompt": "question", ...}."""
    if not values:
        return None
    keys = {}
    for item in (part for value in values for part in value.split(",") if part):
        canonical, sep, name = item.partition("=")
        if not sep or not canonical or not name:
            raise CliError(f"--key-names: expected FIELD=NAME (e.g. prompt=question), got {item!r}")
        keys[canonical] = name
    return keys


def cmd_validate(args) -> int:
    """Check every record of a preference file; exit 0 when all are valid, 1 when any is not."""
    from dpokit.data.validate import load_tokenizer, validate_preference_file
    from dpokit.errors import DpokitError

    if (args.data is None) == (args.hub is None):
        raise CliError("validate: give DATA (a preference file) or --hub REPO (a Hugging Face dataset), one of them")
    if args.hub is None and (args.split or args.subset or args.revision):
        raise CliError("validate: --split, --subset and --revision go with --hub REPO")
    if args.hub is None and not Path(args.data).is_file():
        raise CliError(f"{args.data}: preference data file not found")
    keys = parse_key_names(args.key_names)
    data, format = args.data, args.format
    try:
        if args.hub is not None:
            from dpokit.data.hub import resolve_hub_dataset

            resolved = resolve_hub_dataset(
                args.hub, split=args.split, subset=args.subset, revision=args.revision, format=format, keys=keys
            )
            data, format, keys = resolved.files, resolved.format, resolved.keys  # str(files) names the split
        tokenizer = load_tokenizer(args.tokenizer, args.template)
        report = validate_preference_file(
            data,
            tokenizer,
            format=format,
            keys=keys,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            batch_size=args.batch_size,
            pack_size=args.pack_size,
        )
    except DpokitError as e:
        raise CliError(str(e)) from None
    print(json.dumps(report.as_dict()) if args.json else report.to_text(max_errors=args.max_errors))
    return 0 if report.ok else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_download(args) -> int:
    from dpokit.errors import DpokitError

    if args.subset is not None and not args.dataset:
        raise CliError("download: --subset goes with --dataset (a folder of a dataset repo)")
    try:
        if args.dataset:
            from dpokit.data.hub import download_hub_dataset

            path, splits = download_hub_dataset(
                args.repo_id, subset=args.subset, revision=args.revision, output_dir=args.output_dir
            )
        else:
            from dpokit.models.hub import download_checkpoint

            path = download_checkpoint(args.repo_id, args.output_dir, revision=args.revision)
    except DpokitError as e:
        raise CliError(str(e)) from None
    print(f"downloaded {'dataset ' if args.dataset else ''}{args.repo_id} to {path}")
    if args.dataset:
        print("splits: " + ", ".join(f"{name} ({n} file{'s' if n != 1 else ''})" for name, n in splits.items()))
    return 0


def _comma_list(values: list[str] | None) -> list[str] | None:
    """["a,b", "c"] -> ["a", "b", "c"]; None when the option was not given."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",")]


def cmd_plot(args) -> int:
    from dpokit.plot import plot_runs

    result = plot_runs(args.run_dirs, args.output, labels=_comma_list(args.labels), metrics=_comma_list(args.metrics))
    panels = f"{len(result.titles)} panel{'s' if len(result.titles) != 1 else ''}"
    print(f"wrote {args.output}: {panels} ({', '.join(result.titles)}) for {len(args.run_dirs)} run(s)")
    return 0


def cmd_eval(args) -> int:
    """Preference metrics of each CHECKPOINT against its reference on one preference set."""
    from dpokit.distributed.group import resolve_device
    from dpokit.errors import DpokitError
    from dpokit.eval_checkpoint import EvalData, eval_table, evaluate_checkpoint

    if (args.data is None) == (args.hub is None):
        raise CliError("eval: give --data FILE (a preference file) or --hub REPO (a Hugging Face dataset), one of them")
    if args.hub is None and (args.split or args.subset or args.revision):
        raise CliError("eval: --split, --subset and --revision go with --hub REPO")
    if args.hub is None and not Path(args.data).is_file():
        raise CliError(f"{args.data}: preference data file not found")
    data = EvalData(
        path=args.data,
        hub=args.hub,
        split=args.split,
        subset=args.subset,
        revision=args.revision,
        format=args.format,
        keys=parse_key_names(args.key_names),
    )
    device = resolve_device(args.device)
    results = []
    for checkpoint in args.checkpoints:
        try:
            result = evaluate_checkpoint(
                checkpoint,
                data,
                reference=args.reference,
                base=args.base,
                tokenizer=args.tokenizer,
                template=args.template,
                batch_size=args.batch_size,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                beta=args.loss_beta,
                dtype=args.dtype,
                device=device,
            )
        except DpokitError as e:  # a data file's fix names a PreferenceDataset setting eval does not expose
            raise CliError(e.detail if e.fix_param else str(e)) from None
        results.append(result)
    label = data.label()
    if args.json:
        print(json.dumps({"data": label, "checkpoints": [r.as_dict() for r in results]}))
    else:
        print(eval_table(results, label))
    return 0


def _add_hub_arguments(parser: argparse.ArgumentParser, instead: str) -> None:
    """--hub / --split / --subset / --revision: read a Hugging Face dataset's split."""
    parser.add_argument(
        "--hub", metavar="REPO", help=f"a Hugging Face dataset repo id, {instead} (e.g. Anthropic/hh-rlhf)"
    )
    parser.add_argument("--split", help="with --hub: the split (default: the preset's train split, else train)")
    parser.add_argument("--subset", help="with --hub: a folder of the repo (default: the preset's, else all)")
    parser.add_argument("--revision", help="with --hub: branch, tag or commit (default main)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit", description="Preference alignment recipes (DPO and family).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe with a config", description="Run a recipe with a config.")
    run.add_argument("recipe", help="recipe name (see `dpokit ls`) or a local .py file")
    run.add_argument("--config", required=True, help="config name (e.g. tiny) or a local .yaml file")
    run.add_argument(
        "--nproc_per_node", help="worker processes on this node (default with other launch options: one per GPU)"
    )
    run.add_argument("--nnodes", help="number of nodes (every node runs this command with its own --node_rank)")
    run.add_argument("--node_rank", help="this node's index, 0 .. nnodes-1 (default 0)")
    run.add_argument("--rdzv_endpoint", help="HOST:PORT of node 0, the same on every node (multi-node runs)")
    run.add_argument("overrides", nargs="*", help="config overrides: key=value, +key=value (add), ~key (remove)")
    run.set_defaults(func=cmd_run)

    ls = sub.add_parser("ls", help="list recipes and their configs", description="List recipes and configs.")
    ls.set_defaults(func=cmd_ls)

    cp = sub.add_parser(
        "cp",
        help="copy a recipe or config to customise it",
        description="Copy a recipe (NAME) or a config (RECIPE/CONFIG) to DESTINATION.",
    )
    cp.add_argument("name", help="recipe name, or RECIPE/CONFIG for a config")
    cp.add_argument("destination", help="file or directory to copy to")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cp.set_defaults(func=cmd_cp)

    cat = sub.add_parser("cat", help="print a config", description="Print a packaged config (RECIPE/CONFIG).")
    cat.add_argument("name", help="RECIPE/CONFIG, e.g. dpo_lora_single_device/tiny")
    cat.set_defaults(func=cmd_cat)

    pack = sub.add_parser(
        "pack",
        help="pack a preference dataset offline",
        description="Tokenize a preference file and pack its pairs (chosen and rejected of a "
        "pair stay in one pack); writes OUTPUT (JSONL, a pack per line) and "
        "OUTPUT.stats.json. Recipes read it with dpokit.data.load_packed_dataset.",
    )
    pack.add_argument("input", nargs="?", help="preference data: .jsonl, .jsonl.gz, .json or .parquet")
    pack.add_argument("output", nargs="?", help="packed dataset file to write (.jsonl)")
    _add_hub_arguments(pack, "instead of INPUT")
    pack.add_argument(
        "--max-seq-len", type=_positive_int, required=True, help="truncate prompt+response to this length"
    )
    pack.add_argument("--pack-size", type=_positive_int, required=True, help="tokens per pack (>= 2 x max-seq-len)")
    pack.add_argument(
        "--algorithm",
        choices=["ffd", "ffs"],
        default="ffd",
        help="first-fit-decreasing or first-fit-shuffle (default ffd)",
    )
    pack.add_argument("--prefix-sharing", action="store_true", help="lay pairs out as [prompt][chosen][rejected]")
    pack.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    pack.add_argument(
        "--tokenizer",
        default="dpokit.data.byte_tokenizer",
        help="dotted path of a zero-argument tokenizer builder (default dpokit.data.byte_tokenizer)",
    )
    pack.add_argument("--skip-invalid", action="store_true", help="skip and count malformed records")
    pack.add_argument("--seed", type=int, default=0, help="shuffle seed for ffs")
    pack.set_defaults(func=cmd_pack)

    validate = sub.add_parser(
        "validate",
        help="check a preference dataset before training",
        description="Read DATA as training would, list every invalid record (file:line: field: reason) and "
        "count them by reason; for the valid pairs print token-length percentiles, how many pairs "
        "--max-length truncates, duplicates, and the padding of padded vs packed vs prefix-shared "
        "batches. Exit status: 0 every record valid, 1 some record invalid (or none at all), "
        "2 usage error.",
    )
    validate.add_argument("data", nargs="?", help="preference data: .jsonl, .jsonl.gz, .json or .parquet")
    _add_hub_arguments(validate, "instead of DATA")
    validate.add_argument(
        "--format",
        default="auto",
        help="data format (default: auto-detect from the first record; a wrong name lists them)",
    )
    validate.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (default), a tokenizer.json or tokenizer.model file, or a checkpoint directory",
    )
    validate.add_argument(
        "--template",
        help="chat template, e.g. llama3 or chatml; a wrong name lists them (default: "
        "llama3 for byte / tokenizer.model, else the checkpoint's)",
    )
    validate.add_argument(
        "--max-length",
        type=_positive_int,
        help="count pairs truncated to this many tokens (prompt + response), as max_seq_len",
    )
    validate.add_argument(
        "--max-prompt-length",
        type=_positive_int,
        help="as max_prompt_len: the prompt is cut to this first (default max-length / 2)",
    )
    validate.add_argument(
        "--key-names",
        action="append",
        metavar="FIELD=NAME[,...]",
        help="renamed fields, e.g. prompt=question,chosen=good (repeatable)",
    )
    validate.add_argument("--batch-size", type=_positive_int, default=8, help="pairs per padded batch (default 8)")
    validate.add_argument(
        "--pack-size", type=_positive_int, help="tokens per pack (default 2 x max-length, or 2 x the longest sequence)"
    )
    validate.add_argument("--max-errors", type=int, default=20, help="invalid records to list (default 20)")
    validate.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    validate.set_defaults(func=cmd_validate)

    download = sub.add_parser(
        "download",
        help="download a model (or with --dataset a dataset) from the Hugging Face Hub",
        description="Download weights (safetensors), configs and tokenizer files of REPO_ID; with --dataset, "
        "the data files (.jsonl[.gz], .json[.gz], .parquet) of a dataset repo into the Hugging Face cache, "
        "where --hub / hub= find them, also offline (token: $HF_TOKEN).",
    )
    download.add_argument("repo_id", help="e.g. meta-llama/Llama-3.2-1B-Instruct, or with --dataset Anthropic/hh-rlhf")
    download.add_argument(
        "--output-dir",
        help="where to put it (default: ./checkpoints/<model name>; for --dataset the Hugging Face cache)",
    )
    download.add_argument("--dataset", action="store_true", help="REPO_ID is a dataset repo")
    download.add_argument("--revision", help="branch, tag or commit (default main)")
    download.add_argument("--subset", help="with --dataset: only this folder of the repo (e.g. helpful-base)")
    download.set_defaults(func=cmd_download)

    plot = sub.add_parser(
        "plot",
        help="plot the training curves of runs",
        description="Draw the metrics.jsonl of one or more runs as a grid of panels (loss, accuracy, reward "
        "margin, chosen & rejected rewards, lr, grad norm, tokens/s, and sft loss, peak memory, mfu when "
        "logged): training as lines, validation as markers, one colour per run.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (or its metrics.jsonl)")
    plot.add_argument(
        "-o", "--output", default="curves.png", help="image to write: .png, .svg or .pdf (default curves.png)"
    )
    plot.add_argument(
        "--labels", action="append", metavar="LABEL[,...]", help="legend names, one per run (default: directory names)"
    )
    plot.add_argument(
        "--metrics",
        action="append",
        metavar="NAME[,...]",
        help="panels to draw, in order: loss, accuracy, reward_margin, rewards, lr, grad_norm, tokens_per_s, "
        "sft_loss, peak_memory, mfu (default: every one some run has)",
    )
    plot.set_defaults(func=cmd_plot)

    evaluate = sub.add_parser(
        "eval",
        help="preference metrics of checkpoints against a reference",
        description="Implicit-reward preference accuracy, reward margin, chosen / rejected rewards and "
        "log-probs and the preference loss of each CHECKPOINT on a preference set, as a training run's "
        "validation computes them; one column per checkpoint (or --json). A CHECKPOINT is an HF folder "
        "(e.g. a run's final/), a PEFT adapter folder (e.g. final/adapter) or a run's output_dir, whose "
        "config.yaml then supplies the loss, beta, average_logps, ld_alpha, batch size, lengths and "
        "tokenizer. The reference: --reference, else the base with adapters off (adapters, LoRA runs), "
        "else the weights the run started from (a run's HF folder).",
    )
    evaluate.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="HF folder, adapter folder or run dir")
    evaluate.add_argument("--data", help="preference data: .jsonl, .jsonl.gz, .json or .parquet")
    _add_hub_arguments(evaluate, "instead of --data")
    evaluate.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    evaluate.add_argument(
        "--key-names",
        action="append",
        metavar="FIELD=NAME[,...]",
        help="renamed fields, e.g. prompt=question,chosen=good (repeatable)",
    )
    evaluate.add_argument("--reference", metavar="REF", help="the reference checkpoint (HF folder, adapter or run dir)")
    evaluate.add_argument(
        "--base", metavar="DIR", help="an adapter's base model folder (default: its base_model_name_or_path)"
    )
    evaluate.add_argument(
        "--tokenizer",
        help="'byte', a tokenizer.json or tokenizer.model file, or a checkpoint directory (default: the run's, "
        "else the checkpoint's tokenizer files)",
    )
    evaluate.add_argument("--template", help="chat template, e.g. llama3 or chatml (default: the tokenizer's)")
    evaluate.add_argument(
        "--batch-size", type=_positive_int, help="pairs per batch (default: the run's eval_batch_size, else 8)"
    )
    evaluate.add_argument(
        "--max-length",
        type=_positive_int,
        help="truncate prompt + response to this many tokens (default: the run's validation max_seq_len, "
        "else the model's)",
    )
    evaluate.add_argument(
        "--max-prompt-length", type=_positive_int, help="the prompt is cut to this first (default max-length / 2)"
    )
    evaluate.add_argument(
        "--loss-beta", type=float, metavar="B", help="the loss's beta (default: the run's loss, else DPO with 0.1)"
    )
    evaluate.add_argument("--dtype", help="bf16 / fp32 (default: the run's dtype, else as the checkpoint stores it)")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: cuda if available)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    evaluate.set_defaults(func=cmd_eval)

    from dpokit import generate_cli

    generate_cli.add_parsers(sub, _positive_int)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after the options, so they are collected from the leftovers.
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extra:
        flags = [e for e in extra if e.startswith("-") and not e.startswith("--") or e.startswith("--")]
        if args.command != "run" or flags:
            parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
        args.overrides = [*args.overrides, *extra]
    from dpokit.errors import DpokitError

    try:
        return args.func(args)
    except (CliError, DpokitError) as e:
        print(f"dpokit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from dpokit.config import describe_os_error

        print(f"dpokit: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpokit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
