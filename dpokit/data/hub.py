"""Preference data from Hugging Face Hub dataset repos: the files of one split, kept in the HF cache.

`hub_dataset_files(repo_id, split=..., subset=..., revision=...)` fetches a dataset repo's files of
one split with `huggingface_hub.snapshot_download` into the usual Hugging Face cache (HF_HOME /
HF_HUB_CACHE; with HF_HUB_OFFLINE=1 only the cache is read) and returns their local paths, sorted.
dpokit reads JSONL (.jsonl, .jsonl.gz), JSON (.json, .json.gz) and Parquet (.parquet) files.

Which files belong to a split follows the Hub's naming conventions:
  - files inside a folder named after the split (`train/0000.parquet`, `preference/train/...`);
    when there are any, they are the split;
  - otherwise files named after it: the split name plus an extension (`test.jsonl.gz`), or plus
    a shard suffix (`train-00000-of-00002.parquet`, `train_prefs-00000-of-00001.parquet`). The
    suffix must be a separator and digits, so split `train` does not take `train_prefs-...`.
`subset` names a folder of the repo (hh-rlhf's `helpful-base`, HelpSteer3's `preference`); without
it the split's files of every folder are taken (hh-rlhf: every folder's train.jsonl.gz).

`PRESETS` maps well-known repos to their format, renamed keys, subset and train / validation
splits; `resolve_hub_dataset` applies them where the caller leaves a setting unset.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from dpokit.errors import DpokitError

__all__ = [
    "DATA_SUFFIXES",
    "PRESETS",
    "HubDataset",
    "HubDatasetError",
    "HubPreset",
    "SplitFiles",
    "download_hub_dataset",
    "hub_dataset_files",
    "preset_for",
    "resolve_hub_dataset",
]

DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")  # longest first

# What may follow the split name in a shard's file name: "-00000-of-00002", ".3", "_7", and the
# content hash older Hub uploads append ("-00000-of-00001-5f1c0a2b3d4e5f60"). `^` allows a name
# that is all shard ("0000" in `train/0000.parquet`): it names no split, its folder does.
_SHARD = re.compile(r"(?:^|[-_.])\d+(?:[-_.]of[-_.]\d+)?(?:-[0-9a-f]{8,})?$")


class HubDatasetError(DpokitError):
    """A Hub dataset that cannot be used: not found, not cached offline, no such split or subset."""


@dataclass(frozen=True)
class HubPreset:
    """What dpokit needs to read a well-known Hub preference dataset."""

    format: str
    train_split: str
    validation_split: str | None
    subset: str | None = None
    keys: Mapping[str, str] | None = None


PRESETS: Mapping[str, HubPreset] = MappingProxyType(
    {
        # Folders harmless-base, helpful-base, helpful-online, helpful-rejection-sampled each hold
        # train.jsonl.gz / test.jsonl.gz; red-team-attempts/red_team_attempts.jsonl.gz is no split.
        "Anthropic/hh-rlhf": HubPreset("hh_rlhf", "train", "test"),
        # data/{train,test}_{prefs,sft,gen}-0000N-of-0000M.parquet; chosen / rejected are message
        # lists (user prompt + assistant reply), score_chosen / score_rejected GPT-4 ratings.
        "HuggingFaceH4/ultrafeedback_binarized": HubPreset(
            "conversational",
            "train_prefs",
            "test_prefs",
            keys=MappingProxyType({"chosen_reward": "score_chosen", "rejected_reward": "score_rejected"}),
        ),
        # preference/{train,validation}.jsonl.gz (other folders: feedback, edit, edit_quality).
        "nvidia/HelpSteer3": HubPreset("helpsteer3", "train", "validation", subset="preference"),
        # data/train-0000N-of-00004.parquet; chosen / rejected are message lists; no test split.
        "allenai/llama-3.1-tulu-3-8b-preference-mixture": HubPreset("conversational", "train", None),
    }
)


def preset_for(repo_id: str) -> HubPreset | None:
    """The preset of a repo id (Hub ids are case-insensitive), or None."""
    return next((preset for name, preset in PRESETS.items() if name.lower() == repo_id.lower()), None)


class SplitFiles(list):
    """The local files of one split, in reading order (a list of Paths); str() names the split,
    e.g. "Anthropic/hh-rlhf split 'train'", for messages about the data as a whole."""

    def __init__(self, files: Iterable[Path], name: str):
        super().__init__(files)
        self.name = name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class HubDataset:
    """A split of a Hub dataset resolved to local files, with the format and keys to read it."""

    repo_id: str
    split: str
    subset: str | None
    files: SplitFiles
    format: str
    keys: Mapping[str, str] | None


# --- which files make a split ----------------------------------------------------------------


def _stem_and_suffix(name: str) -> tuple[str, str]:
    """("train-00000-of-00001", ".parquet"); the suffix is a data suffix when the name has one."""
    lower = name.lower()
    for suffix in DATA_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    stem, dot, rest = name.partition(".")
    return stem, dot + rest


def _named_split(name: str) -> str:
    """The split a file name names ("train_prefs-00000-of-00001.parquet" -> "train_prefs"); "" for a
    bare shard ("0000.parquet")."""
    stem, _ = _stem_and_suffix(name)
    shard = _SHARD.search(stem)
    return stem[: shard.start()] if shard else stem


def _is_data_file(relpath: str) -> bool:
    return _stem_and_suffix(relpath.rsplit("/", 1)[-1])[1].lower() in DATA_SUFFIXES


def _split_files(relpaths: Iterable[str], split: str) -> list[str]:
    """The paths (relative to the subset, "/"-separated) that make `split`, sorted: those in a
    folder named after it if any, else those named after it."""
    relpaths = sorted(relpaths)
    in_folder = [p for p in relpaths if split in p.split("/")[:-1]]
    return in_folder or [p for p in relpaths if _named_split(p.rsplit("/", 1)[-1]) == split]


def _splits(relpaths: Iterable[str]) -> list[str]:
    """The split names data files make: by file name, or by folder for bare shards."""
    names = set()
    for relpath in relpaths:
        *folders, name = relpath.split("/")
        names.add(_named_split(name) or (folders[-1] if folders else ""))
    return sorted(n for n in names if n)


def _snapshot_files(root: Path) -> list[str]:
    """Every file under a snapshot folder, relative and "/"-separated, skipping hidden ones
    (.gitattributes, the .cache/ metadata folder a --output-dir download writes)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = Path(folder).relative_to(root)
        found += [(relative / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(found)


def _in_subset(relpaths: Iterable[str], subset: str | None) -> list[str]:
    """The paths under the `subset` folder, relative to it (all paths when subset is None)."""
    if subset is None:
        return list(relpaths)
    prefix = subset.strip("/") + "/"
    return [p[len(prefix) :] for p in relpaths if p.startswith(prefix)]


def _folders(relpaths: Iterable[str]) -> list[str]:
    return sorted({p.split("/", 1)[0] for p in relpaths if "/" in p})


# --- talking to huggingface_hub --------------------------------------------------------------


def _hub_errors():
    """The module holding huggingface_hub's exceptions (`errors` since 0.24, `utils` before)."""
    try:
        from huggingface_hub import errors
    except ImportError:
        from huggingface_hub import utils as errors
    return errors


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download_command(repo_id: str, subset: str | None, revision: str | None) -> str:
    command = ["dpokit", "download", repo_id, "--dataset"]
    command += ["--subset", subset] if subset else []
    command += ["--revision", revision] if revision else []
    return f"run `{shlex.join(command)}` where there is network"


def _cached_revisions(repo_id: str) -> list[str] | None:
    """The revisions (refs) cached for a dataset repo; None when the repo is not cached at all."""
    storage = Path(_cache_dir()) / f"datasets--{repo_id.replace('/', '--')}"
    if not storage.is_dir():
        return None
    refs = storage / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_error(error: Exception, repo_id: str, subset: str | None, revision: str | None) -> HubDatasetError | None:
    """One-line `HubDatasetError` for an exception of `snapshot_download` (None: not one of its)."""
    errors = _hub_errors()
    fix = _download_command(repo_id, subset, revision)
    cache = _cache_dir()
    if isinstance(error, getattr(errors, "GatedRepoError", ())):
        return HubDatasetError(f"{repo_id}: a gated dataset; accept its terms on huggingface.co and set HF_TOKEN")
    if isinstance(error, errors.RepositoryNotFoundError):
        return HubDatasetError(
            f"{repo_id}: no such dataset repo on the Hugging Face Hub (check the id; a private one needs HF_TOKEN)"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return HubDatasetError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub (a branch, tag or commit)")
    if isinstance(error, getattr(errors, "IncompleteSnapshotError", ())):
        return HubDatasetError(
            f"{repo_id}: the cached snapshot in {cache} lacks some of the files asked for and the Hub "
            f"cannot be reached{' (HF_HUB_OFFLINE=1)' if _offline() else ''}; {fix}"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        revisions = _cached_revisions(repo_id)
        if revisions is None:
            where = f"not in the Hugging Face cache ({cache})"
        else:
            cached = ", ".join(revisions) or "none"
            where = f"revision {revision or 'main'!r} not in the Hugging Face cache ({cache}; cached: {cached})"
        if _offline():
            return HubDatasetError(f"{repo_id}: {where} and HF_HUB_OFFLINE=1; {fix}")
        return HubDatasetError(f"{repo_id}: {where} and the Hub cannot be reached (check the network); {fix}")
    if isinstance(error, getattr(errors, "HFValidationError", ())):
        return HubDatasetError(f"{repo_id!r}: not a Hugging Face repo id ({_first_line(error)})")
    if isinstance(error, getattr(errors, "HfHubHTTPError", ())):
        return HubDatasetError(f"{repo_id}: the Hugging Face Hub refused the download ({_first_line(error)})")
    return None


def _snapshot(
    repo_id: str,
    *,
    revision: str | None,
    subset: str | None,
    allow_patterns: list[str],
    local_dir: str | Path | None = None,
) -> Path:
    """`snapshot_download` of a dataset repo (files matching `allow_patterns`) -> its local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise HubDatasetError("huggingface_hub is not installed: pip install huggingface-hub") from None
    try:
        path = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=allow_patterns,
            local_dir=local_dir,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except Exception as e:  # huggingface_hub's many errors: each turned into one line saying what to do
        converted = _hub_error(e, repo_id, subset, revision)
        if converted is None:
            raise
        raise converted from None
    return Path(path)


def _split_patterns(split: str, subset: str | None) -> list[str]:
    """allow_patterns fetching the split's files and little else (fnmatch: `*` also matches "/")."""
    prefix = glob.escape(subset.strip("/")) + "/" if subset else ""
    name = glob.escape(split)
    patterns = [f"{name}/*", f"{name}.*", f"{name}[-_.][0-9]*"]
    return [f"{prefix}{where}{p}" for p in patterns for where in ("", "*/")]


def _repo_listing(repo_id: str, revision: str | None, snapshot: Path) -> tuple[list[str], bool]:
    """(every file path of the repo, True) asked of the Hub, or offline (or when that fails) the
    files of the cached snapshot and False."""
    if not _offline():
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=os.environ.get("HF_TOKEN") or None)
            return sorted(api.list_repo_files(repo_id, repo_type="dataset", revision=revision)), True
        except Exception:  # the Hub cannot be asked after all: the cached files are all there is to list
            pass
    return _snapshot_files(snapshot), False


# --- the public functions ----------------------------------------------------------------------


def _describe(repo_id: str, split: str, subset: str | None, revision: str | None) -> str:
    return f"{repo_id}{f' subset {subset!r}' if subset else ''} split {split!r}{f' @ {revision}' if revision else ''}"


def hub_dataset_files(
    repo_id: str, *, split: str = "train", subset: str | None = None, revision: str | None = None
) -> list[Path]:
    """The local data files (JSONL, JSON or Parquet) of one split of a Hub dataset repo, sorted.

    Downloads what the cache lacks (see the module docstring for which files make a split); the
    result is a `SplitFiles`, a list whose str() names the repo and split. Raises a one-line
    `HubDatasetError` for a repo, revision, subset or split that is not there, for a repo neither
    cached nor reachable, and for a split with no file in a supported format.
    """
    snapshot = _snapshot(repo_id, revision=revision, subset=subset, allow_patterns=_split_patterns(split, subset))
    cached = _snapshot_files(snapshot)
    relative = _in_subset(cached, subset)
    chosen = _split_files(relative, split)
    data = [p for p in chosen if _is_data_file(p)]
    if data:
        prefix = f"{subset.strip('/')}/" if subset else ""
        files = [snapshot / f"{prefix}{p}" for p in data]
        return SplitFiles(files, _describe(repo_id, split, subset, revision))
    if chosen:
        shown = ", ".join(chosen[:5])
        raise HubDatasetError(
            f"{_describe(repo_id, split, subset, revision)}: no file in a format dpokit reads ({shown}); "
            f"it reads {', '.join(sorted(DATA_SUFFIXES))}"
        )
    listing, complete = _repo_listing(repo_id, revision, snapshot)
    where = "the repo has" if complete else f"the cache ({_cache_dir()}) has"
    fix = "" if complete else f"; if the Hub has more, {_download_command(repo_id, subset, revision)}"
    if subset is not None and not _in_subset(listing, subset):
        folders = ", ".join(_folders(p for p in listing if _is_data_file(p))) or "none"
        raise HubDatasetError(f"{repo_id}: no subset folder {subset!r}; {where} folders: {folders}{fix}")
    splits = ", ".join(_splits(p for p in _in_subset(listing, subset) if _is_data_file(p))) or "none"
    raise HubDatasetError(
        f"{_describe(repo_id, split, subset, revision)}: no such split; {where} splits: {splits}{fix}"
    )


def resolve_hub_dataset(
    repo_id: str,
    *,
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    format: str = "auto",
    keys: Mapping[str, str] | None = None,
) -> HubDataset:
    """The files of a Hub dataset's split plus the format and keys to read them with: a preset's
    (`PRESETS`) where the caller leaves split (None), subset (None), format ("auto") or keys (None)
    unset; without a preset split defaults to "train"."""
    preset = preset_for(repo_id)
    if preset is not None:
        split = preset.train_split if split is None else split
        subset = preset.subset if subset is None else subset
        format = preset.format if format == "auto" else format
        keys = preset.keys if keys is None else keys
    split = "train" if split is None else split
    files = hub_dataset_files(repo_id, split=split, subset=subset, revision=revision)
    return HubDataset(repo_id, split, subset, files, format, dict(keys) if keys is not None else None)


def download_hub_dataset(
    repo_id: str,
    *,
    subset: str | None = None,
    revision: str | None = None,
    output_dir: str | Path | None = None,
) -> tuple[Path, dict[str, int]]:
    """Fetch every data file of a dataset repo (of the `subset` folder only, when given) into the HF
    cache, or into `output_dir`. Returns (the local folder, {split: number of files})."""
    prefix = glob.escape(subset.strip("/")) + "/" if subset else ""
    patterns = [f"{prefix}*{suffix}" for suffix in DATA_SUFFIXES]
    snapshot = _snapshot(repo_id, revision=revision, subset=subset, allow_patterns=patterns, local_dir=output_dir)
    data = [p for p in _in_subset(_snapshot_files(snapshot), subset) if _is_data_file(p)]
    if not data:
        where = f"{repo_id}{f' subset {subset!r}' if subset else ''}"
        raise HubDatasetError(f"{where}: no data file in a format dpokit reads ({', '.join(sorted(DATA_SUFFIXES))})")
    counts = {split: len(_split_files(data, split)) for split in _splits(data)}
    return snapshot, counts
