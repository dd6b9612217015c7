"""The config layer of the recipes: YAML, overrides and `_component_` instantiation. Only the
recipes and the CLI import it; the library packages (data, losses, models, training) never see a
config (a test checks that none of them imports this module or omegaconf).

- `load_config(path, overrides)`: an omegaconf YAML file plus command-line overrides
  (`key=value` sets an existing key, `+key=value` adds one, `~key` removes one).
- `check_keys(cfg, known)`: the top-level keys a recipe reads; anything else is a typo.
- `instantiate(node, **extra)`: builds `node._component_` (a dotted import path) with the node's
  other keys as arguments; `_partial_: true` returns a `functools.partial` instead.
- `recipe_main(main, known_keys)`: the `__main__` entry of a recipe: parses `--config` and
  overrides, and turns every `DpokitError` (bad config, bad data) into one `error: ...` line and exit code 2.

Every mistake is a `ConfigError` whose message names the file and key.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import inspect
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpokit.errors import DpokitError, RunInterrupted


class ConfigError(DpokitError):
    """A bad config file, key, override or component; the message is meant for the user."""


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            keys += _all_keys(cfg._get_node(key), f"{full}.")
    return keys


def _parse_value(raw: str) -> Any:
    """The value as the YAML file would give it (omegaconf's loader: `1e-3` is a float)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]), resolve=False)["v"]
    except (OmegaConfBaseException, yaml.YAMLError):
        return raw


def _check_override_type(source: str, override: str, old: Any, new: Any) -> None:
    if old is None or new is None or isinstance(old, (dict, list, DictConfig, ListConfig)):
        return
    numbers = (int, float)
    ok = (
        isinstance(new, type(old))
        or (isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool))
        or (isinstance(old, str) and isinstance(new, (*numbers, bool)))  # "1e-3" style strings stay usable
    )
    if isinstance(old, bool) != isinstance(new, bool) and not isinstance(old, str):
        ok = False
    if not ok:
        raise ConfigError(
            f"{source}: override {override!r}: expected {type(old).__name__} (current value {old!r}), "
            f"got {type(new).__name__}"
        )


def apply_overrides(cfg: DictConfig, overrides: list[str], source: str) -> DictConfig:
    for override in overrides:
        if override.startswith("~"):
            key = override[1:]
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent:
                raise ConfigError(f"{source}: override {override!r}: no key {key!r} to remove")
            parent.pop(leaf)
            continue
        if "=" not in override:
            raise ConfigError(f"{source}: bad override {override!r}: expected key=value, +key=value or ~key")
        key, raw = override.split("=", 1)
        adding = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise ConfigError(f"{source}: bad override {override!r}: empty key")
        exists = OmegaConf.select(cfg, key, default="__missing__", throw_on_missing=False) != "__missing__"
        if not exists and not adding:
            hint = _did_you_mean(key, _all_keys(cfg))
            raise ConfigError(
                f"{source}: override {override!r}: no key {key!r} in the config{hint}; use '+{key}=...' to add one"
            )
        if exists and adding:
            raise ConfigError(f"{source}: override {override!r}: key {key!r} already exists; drop the '+'")
        new = _parse_value(raw)
        if exists:
            _check_override_type(source, override, OmegaConf.select(cfg, key), new)
        try:
            OmegaConf.update(cfg, key, new, merge=False, force_add=adding)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: override {override!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a YAML mapping at the top level")
    cfg = apply_overrides(cfg, list(overrides), str(path))
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def check_keys(cfg: DictConfig, known: Iterable[str]) -> None:
    """Every key must be one the recipe reads: `known` holds top-level names and, for plain
    nested settings the recipe reads key by key, dotted names ("checkpoint.every"), so a typo one
    level down is caught as well as a top-level one."""
    known = list(known)
    top = {k.split(".")[0] for k in known}
    for key in cfg.keys():
        if key not in top:
            raise ConfigError(f"unknown key {key!r}{_did_you_mean(str(key), top)}")
    missing = sorted(top - set(cfg.keys()))
    if missing:
        raise ConfigError(f"missing key(s) {missing}")
    nested: dict[str, set[str]] = {}
    for name in known:
        if "." in name:
            parent, _, child = name.partition(".")
            nested.setdefault(parent, set()).add(child)
    for parent, children in nested.items():
        node = cfg[parent]
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{parent}: expected a mapping with keys {sorted(children)}, got {node!r}")
        for key in node.keys():
            if key not in children:
                dotted = [f"{parent}.{c}" for c in children]
                raise ConfigError(f"unknown key '{parent}.{key}'{_did_you_mean(f'{parent}.{key}', dotted)}")
        absent = sorted(f"{parent}.{c}" for c in children - set(node.keys()))
        if absent:
            raise ConfigError(f"missing key(s) {absent}")


# Settings every recipe shares, and the values that make sense for them.
WHOLE_NUMBERS_FROM_1 = ("batch_size", "gradient_accumulation_steps", "epochs", "eval_every", "eval_batch_size")


def check_values(cfg: DictConfig) -> None:
    """Ranges of the shared numeric settings, checked before anything is loaded (a 0 would
    otherwise surface as a ZeroDivisionError minutes later, or not at all)."""

    def whole(key: str, value, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: {value!r} is not a whole number >= {minimum}")

    for key in WHOLE_NUMBERS_FROM_1:
        if key in cfg:
            whole(key, cfg[key], 1)
    if cfg.get("max_steps") is not None:
        whole("max_steps", cfg.max_steps, 1)
    if "max_grad_norm" in cfg:
        norm = cfg.max_grad_norm
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0:
            raise ConfigError(f"max_grad_norm: {norm!r} is not a number > 0")
    if "seed" in cfg:
        whole("seed", cfg.seed, 0)


def _import(dotted: str, where: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}: _component_ {dotted!r} must be a dotted path such as 'torch.optim.AdamW'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        # Maybe a nested attribute such as pkg.Class.method
        parent, _, _ = module_name.rpartition(".")
        if parent:
            try:
                return getattr(_import(module_name, where), attr)
            except (ConfigError, AttributeError):
                pass
        raise ConfigError(f"{where}: cannot import {module_name!r} for _component_ {dotted!r} ({e})") from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{where}: {module_name!r} has no {attr!r}{_did_you_mean(attr, public)}")
    return getattr(module, attr)


def _node_path(node: DictConfig) -> str:
    try:
        key = node._get_full_key(None)
    except Exception:  # noqa: BLE001 - the path is only for messages
        key = ""
    return key or "<root>"


def _value(value: Any) -> Any:
    if isinstance(value, DictConfig) and "_component_" in value:
        return instantiate(value)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def instantiate(node: DictConfig, *args: Any, **extra: Any) -> Any:
    """Build `node._component_(*args, **node_keys, **extra)`; extra arguments win over the node's."""
    if not isinstance(node, DictConfig) or "_component_" not in node:
        where = _node_path(node) if isinstance(node, DictConfig) else "value"
        raise ConfigError(f"config key {where!r} needs a '_component_' to instantiate")
    where = _node_path(node)
    target = _import(str(node["_component_"]), where)
    kwargs = {str(k): _value(node[k]) for k in node.keys() if not str(k).startswith("_")}
    kwargs.update(extra)
    partial = bool(node.get("_partial_", False))
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_any:
            for name in kwargs:
                if name not in params:
                    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
                    raise ConfigError(
                        f"{where}.{name}: not a parameter of {node['_component_']}{_did_you_mean(name, accepted)}"
                    )
        if not partial:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as e:
                raise ConfigError(f"{where}: cannot call {node['_component_']}: {e}") from None
    if partial:
        return functools.partial(target, *args, **kwargs)
    try:
        return target(*args, **kwargs)
    except ConfigError:
        raise
    except DpokitError as e:
        # The component's own error names its place (a data file and line, a checkpoint); a fix
        # it names is spelled as the key to set (e.g. train_dataset.skip_invalid=true).
        fix = e.fix_param
        raise DpokitError(e.message_with_fix(f"{where}.{fix}={e.fix_value}") if fix else str(e)) from None
    except ValueError as e:
        # A builder refusing its arguments (e.g. a LoRA rank of 0) is a config mistake; a fix it
        # names is spelled as the key to set.
        fix = getattr(e, "fix_param", None)
        message = e.message_with_fix(f"{where}.{fix}={e.fix_value}") if fix else str(e)
        raise ConfigError(f"{where} ({node['_component_']}): {message}") from e


def instantiate_weighted(
    entries: DictConfig, where: str, *args: Any, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A named map of `{weight: w, dataset: {_component_: ...}}` entries (e.g. `train_datasets`)
    -> ({name: instantiated dataset}, {name: weight}); a key other than those two is an error."""
    if not isinstance(entries, DictConfig):
        raise ConfigError(f"{where}: expected a mapping of name -> {{weight: ..., dataset: ...}}, got {entries!r}")
    datasets, weights = {}, {}
    for name, entry in entries.items():
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"{where}.{name}: expected {{weight: ..., dataset: ...}}, got {entry!r}")
        for key in entry.keys():
            if key not in ("weight", "dataset"):
                raise ConfigError(f"unknown key '{where}.{name}.{key}'{_did_you_mean(str(key), ['weight', 'dataset'])}")
        if entry.get("dataset") is not None:
            datasets[str(name)] = instantiate(entry.dataset, *args, **extra)
        if entry.get("weight") is not None:
            weights[str(name)] = entry.weight
    return datasets, weights


def instantiate_datasets(cfg: DictConfig, tokenizer: Any, say: Callable[[str], None]) -> tuple[Any, dict]:
    """The training set (`train_dataset`, or the weighted mixture of `train_datasets`) and the
    validation sets ({None: validation_dataset, name: each of `validation_datasets`}), each
    summarised through `say`. Every recipe reads its data through this one function."""
    if cfg.train_datasets:  # a weighted mixture of named sets (docs/data.md), deterministic given the seed
        if cfg.train_dataset is not None:
            raise ConfigError("give train_dataset or train_datasets, not both (train_dataset=null for a mixture)")
        from dpokit.data import mix_preference_datasets

        datasets, weights = instantiate_weighted(cfg.train_datasets, "train_datasets", tokenizer=tokenizer)
        train_set = mix_preference_datasets(datasets, weights, seed=cfg.seed)
    else:
        train_set = instantiate(cfg.train_dataset, tokenizer=tokenizer)
    validation_sets = {None: instantiate(cfg.validation_dataset, tokenizer=tokenizer)}
    say(f"train: {train_set.stats.summary()}\nvalidation: {validation_sets[None].stats.summary()}")
    for name, dataset_cfg in (cfg.validation_datasets or {}).items():
        validation_sets[str(name)] = instantiate(dataset_cfg, tokenizer=tokenizer)
        say(f"validation {name}: {validation_sets[str(name)].stats.summary()}")
    return train_set, validation_sets


SAMPLE_KEYS = ("prompts", "max_new_tokens", "temperature", "top_k", "top_p")


def sample_prompts(node: DictConfig | None, *, seed: int = 0, tokenizer: Any = None):
    """The `samples:` section as a `dpokit.training.SamplePrompts` (None when null): prompts to
    decode at each validation by the policy and the reference. With `tokenizer`, every prompt is
    rendered now, so one its chat template refuses stops the run before step 1."""
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"samples: expected a mapping ({{prompts: [...], max_new_tokens: 64}}) or null, got {node!r}")
    for key in node.keys():
        if key not in SAMPLE_KEYS:
            raise ConfigError(f"unknown key 'samples.{key}'{_did_you_mean(str(key), SAMPLE_KEYS)}")
    prompts = node.get("prompts")
    prompts = OmegaConf.to_container(prompts) if isinstance(prompts, ListConfig) else None
    if not prompts:
        raise ConfigError("samples.prompts: expected a non-empty list of prompts (strings or message lists)")
    for i, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) and prompt) and not (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt)
        ):
            raise ConfigError(f"samples.prompts[{i}]: expected a string or a list of {{role, content}}, got {prompt!r}")
    from dpokit.generation import Sampling
    from dpokit.training.samples import SamplePrompts

    max_new_tokens = node.get("max_new_tokens", 64)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"samples.max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    try:
        sampling = Sampling(
            temperature=float(node.get("temperature", 0.0)),
            top_k=int(node.get("top_k", 0)),
            top_p=float(node.get("top_p", 1.0)),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"samples: {e}") from None
    spec = SamplePrompts(prompts=prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
    if tokenizer is not None:
        from dpokit.training.samples import encode_prompts

        try:
            encode_prompts(tokenizer, spec)
        except DpokitError as e:
            raise ConfigError(str(e)) from None
    return spec


def checkpointer(node: DictConfig, *, trainable_only: bool = False):
    """The `checkpoint:` section as a `dpokit.training.Checkpointer` (every key of it is one argument)."""
    from dpokit.training import Checkpointer

    return Checkpointer(
        node.dir,
        every=node.every,
        keep_last=node.keep_last,
        on_interrupt=node.on_interrupt,
        keep_top_k=node.keep_top_k,
        metric=node.metric,
        higher_is_better=node.higher_is_better,
        trainable_only=trainable_only,
    )


def parse_recipe_args(argv: list[str] | None = None, description: str | None = None) -> tuple[Path, list[str]]:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value (set), +key=value (add), ~key (remove)")
    args = parser.parse_args(argv)
    return Path(args.config), args.overrides


class Terminated(BaseException):
    """SIGTERM outside the training loop (loading, the final save): stop as Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated()


def recipe_main(main: Callable[[DictConfig], Any], known_keys: Iterable[str], argv: list[str] | None = None) -> None:
    """Entry point of a recipe file, and the one exit of its process. A failure the user can act on
    ends as one line and an exit code, no traceback: bad config or data 2 (`DpokitError`), a
    file that cannot be read or written 2 (the path and the reason), interrupted 130 (with the
    checkpoint and the command that resumes), another process of the run gone 1. Under
    `dpokit run --nproc_per_node N` the line goes to the launcher, which prints one for all ranks."""
    path, overrides = parse_recipe_args(argv, description=(main.__doc__ or "").strip().splitlines()[0] or None)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        _run(main, known_keys, path, overrides, multi_process)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    if _launched_worker():  # a finished worker: skip the C++ teardown
        from dpokit.distributed.group import exit_worker

        exit_worker(0)


def _launched_worker() -> bool:
    """Started by `dpokit run` or torchrun (not called in-process, e.g. by a test)."""
    from dpokit.launch import ERROR_DIR_ENV

    return ERROR_DIR_ENV in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def _run(main, known_keys, path: Path, overrides: list[str], multi_process: bool) -> None:
    from dpokit.launch import LOST_PEER, lost_peer, report_failure, resume_hint

    try:
        cfg = load_config(path, overrides)  # its errors name the file already
        try:
            check_keys(cfg, known_keys)
            check_values(cfg)
            main(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    except RunInterrupted as e:
        resume = f"; resume with: {resume_hint()}" if e.checkpoint else ""
        _exit(report_failure, f"{e}{resume}", 130)
    except DpokitError as e:
        _exit(report_failure, str(e), 2)
    except (KeyboardInterrupt, Terminated) as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        _exit(report_failure, f"interrupted ({name}) outside a training step; nothing was saved by this stop", 130)
    except OSError as e:
        _exit(report_failure, describe_os_error(e), 2 if e.filename else 1)
    except Exception as e:
        if multi_process and lost_peer(e):
            message = (
                f"lost contact with another process of this run (it stopped, or its node went down): {_peer_error(e)}"
            )
            _exit(report_failure, message, 1, kind=LOST_PEER)
        raise


def _peer_error(error: BaseException) -> str:
    """The useful part of a backend's message ("Connection closed by peer [10.0.0.2]:4242")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)  # the C++ source location
    return text.split(". This is typically")[0].rstrip(".")


def describe_os_error(error: OSError) -> str:
    """`path: reason` for a failed read or write (disk full, read-only, permission, not a folder)."""
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p)
    reason = error.strerror or str(error)
    return f"{paths}: {reason}" if paths else reason


def _exit(report, message: str, code: int, *, kind: str | None = None) -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # end the progress line before the error's
        bar.close()
    report(message, code, kind=kind)
    if _launched_worker() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dpokit.distributed.group import exit_worker

        exit_worker(code)  # no C++ teardown of a group whose peers may be gone
    sys.exit(code)
