"""`dpokit generate` and `dpokit chat`: look at what a checkpoint says.

CHECKPOINT is anything `dpokit.resolve.load_for_inference` loads: an HF folder (a run's
`final/`, a downloaded model), a PEFT adapter folder on its base (`final/adapter`), or a run's
output_dir. Prompts are user messages rendered with the checkpoint's chat template (and its
generation prompt), or with --raw plain text continued as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from dpokit.errors import DpokitError


def add_parsers(sub, positive_int) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", metavar="CHECKPOINT", help="HF folder, adapter folder or run dir")
    common.add_argument("--base", metavar="DIR", help="an adapter's base model folder (default: its config's)")
    common.add_argument("--tokenizer", help="'byte', a tokenizer file or folder (default: the checkpoint's)")
    common.add_argument("--template", help="chat template, e.g. llama3 or chatml (default: the tokenizer's)")
    common.add_argument("--system", help="a system message opening every conversation")
    common.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per reply (default 256)")
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    common.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    common.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default 0 = off)")
    common.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    common.add_argument(
        "--adapters", choices=("on", "off"), default="on", help="off: decode the base of a LoRA checkpoint"
    )
    common.add_argument("--no-cache", action="store_true", help="recompute every step (slow; a check)")
    common.add_argument("--dtype", help="bf16 / fp32 (default: as the checkpoint stores it)")
    common.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: cuda if available)")

    generate = sub.add_parser(
        "generate",
        parents=[common],
        help="generate replies from a checkpoint",
        description="Reply to --prompt (streamed) or to every prompt of --prompts FILE (a .txt file with one "
        "prompt per line, or .jsonl with a 'prompt' string or a 'messages' list per line; batched).",
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message (repeatable)")
    source.add_argument("--prompts", metavar="FILE", help="prompts, one per line (.txt) or per JSON line (.jsonl)")
    generate.add_argument("--raw", action="store_true", help="continue the prompt text as is (no chat template)")
    generate.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together (default 8)")
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, completion")
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="talk to a checkpoint in the terminal",
        description="An interactive conversation: each line you type is a user turn, the reply streams back "
        "and joins the history. /reset starts over, /exit (or Ctrl-D) leaves.",
    )
    chat.set_defaults(func=cmd_chat)


def _load(args):
    from dpokit.distributed.group import resolve_device
    from dpokit.eval_checkpoint import eval_tokenizer
    from dpokit.generation import Sampling
    from dpokit.resolve import load_for_inference

    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise DpokitError(f"{args.command}: {e}") from None
    loaded = load_for_inference(args.checkpoint, base=args.base, dtype=args.dtype, device=resolve_device(args.device))
    if args.adapters == "off" and loaded.adapter is None:
        raise DpokitError(f"--adapters off: {loaded.description} has no LoRA adapters to switch off")
    tokenizer, _ = eval_tokenizer(loaded, args.tokenizer, args.template)
    return loaded, tokenizer, sampling


def _adapters(loaded, args):
    from dpokit.models import disable_adapter

    return disable_adapter(loaded.model) if args.adapters == "off" else nullcontext()


def _generator(model, seed: int):
    import torch

    return torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)


def _conversation(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def read_prompts(path: str) -> list[str | list[dict]]:
    """The prompts of a .txt (one per non-empty line) or .jsonl file ({"prompt": str} or
    {"messages": [...]} per line); a bad line is a DpokitError naming file:line."""
    file = Path(path)
    if not file.is_file():
        raise DpokitError(f"{path}: prompts file not found")
    prompts: list[str | list[dict]] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DpokitError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
            prompts.append(record["messages"])
        else:
            raise DpokitError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    if not prompts:
        raise DpokitError(f"{path}: no prompts in it")
    return prompts


def cmd_generate(args) -> int:
    from dpokit.generation import generate, stop_ids, stream_text

    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    loaded, tokenizer, sampling = _load(args)

    def encode(prompt) -> list[int]:
        if args.raw:
            if not isinstance(prompt, str):
                raise DpokitError("--raw takes text prompts, not message lists")
            return tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.encode_prompt(_conversation(args.system, messages))

    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            encoded.append(encode(prompt))
        except (ValueError, KeyError, TypeError) as e:  # a turn the chat template refuses
            where = f"{args.prompts}: prompt {i + 1}" if args.prompts else f"--prompt {i + 1}"
            raise DpokitError(f"{where}: {e}") from None
    settings = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, use_cache=not args.no_cache)
    with _adapters(loaded, args):
        if len(prompts) == 1 and not args.json:  # stream it
            for piece in stream_text(
                loaded.model, tokenizer, encoded[0], generator=_generator(loaded.model, args.seed), **settings
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        stops = stop_ids(tokenizer)
        generator = _generator(loaded.model, args.seed)
        for start in range(0, len(prompts), args.batch_size):
            outs = generate(
                loaded.model, encoded[start : start + args.batch_size], stop_ids=stops, generator=generator, **settings
            )
            for prompt, out in zip(prompts[start : start + args.batch_size], outs):
                text = tokenizer.decode([t for t in out if t not in stops])
                if args.json:
                    print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False), flush=True)
                else:
                    shown = prompt if isinstance(prompt, str) else prompt[-1].get("content", "")
                    print(f">>> {shown}\n{text}\n", flush=True)
    return 0


def cmd_chat(args) -> int:
    from dpokit.generation import stream_text

    loaded, tokenizer, sampling = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{loaded.description}: type a message; /reset starts over, /exit leaves", file=sys.stderr)
    history: list[dict] = []
    generator = _generator(loaded.model, args.seed)
    with _adapters(loaded, args):
        while True:
            if interactive:
                sys.stderr.write("you> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            message = line.rstrip("\n")
            if message.strip() == "/reset":
                history = []
                continue
            if not message.strip():
                continue
            history.append({"role": "user", "content": message})
            try:
                prompt = tokenizer.encode_prompt(_conversation(args.system, history))
            except (ValueError, KeyError, TypeError) as e:  # e.g. --system with a template that has none
                print(f"dpokit: error: {e}", file=sys.stderr)
                history.pop()
                continue
            reply = ""
            for piece in stream_text(
                loaded.model,
                tokenizer,
                prompt,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                generator=generator,
                use_cache=not args.no_cache,
            ):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": reply})
