"""A checkpoint named by a folder or by a Hugging Face repo id.

A repo id is resolved through huggingface_hub's cache, as transformers resolves
it: the cache under HF_HOME (or HF_HUB_CACHE), HF_HUB_OFFLINE, HF_ENDPOINT and
the token from HF_TOKEN or `hf auth login`, all read by huggingface_hub itself.
Only the files lvb reads are fetched: the small ones for the runtime, plus the
safetensors for export and verify. huggingface_hub draws its own download bars
(HF_HUB_DISABLE_PROGRESS_BARS hides them).

huggingface_hub comes with tokenizers, so this works with the lean runtime too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lvb.errors import LvbError

# What the runtime reads from a checkpoint (lvb.runtime.pipeline.Checkpoint.load and
# lvb.text), plus lvb-task.json for verify. Absent ones are simply not there.
RUNTIME_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "lvb-task.json",
)
# Top-level weights only (Meta's repos keep other formats under original/, others keep
# variants in folders of their own): fnmatch's "*" crosses "/", so SUBFOLDERS is left out.
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json")
SUBFOLDERS = ("*/*",)

# huggingface_hub's rule for a repo name: letters, digits, "-", "_", "."; no "--" or "..",
# no leading or trailing "-" or "."; at most 96 characters.
_NAME = r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")


class HubError(LvbError):
    """A repo id that cannot be resolved; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint's files are on this machine, and what it is called."""

    directory: Path
    name: str  # the folder's name, or the repo's name (a snapshot folder is named by its commit)
    repo_id: str | None = None
    commit: str | None = None

    def to_json(self) -> dict:
        """What the export manifest records beyond the folder: the repo and its commit."""
        return {"name": self.name, "repo_id": self.repo_id, "commit": self.commit} if self.repo_id else {}


def is_repo_id(value: str) -> bool:
    """True when `value` names a Hub repo rather than a folder. An existing folder always
    wins, and anything spelled like a path (./x, /x, ~/x, a/b/c) is a path."""
    if Path(value).expanduser().exists():
        return False
    return _REPO_ID.fullmatch(value) is not None


def resolve_model(value: str | Path, revision: str | None = None, weights: bool = False) -> ModelSource:
    """The checkpoint folder for `--model VALUE`: the folder itself, or the repo's snapshot
    in the Hugging Face cache, downloading what is missing. `weights` adds the safetensors."""
    value = str(value)
    if not is_repo_id(value):
        if revision is not None:
            raise HubError(f"--revision applies to a Hugging Face repo id, and {value} is a folder; drop --revision")
        directory = Path(value).expanduser()
        if directory.exists() and not directory.is_dir():
            raise HubError(f"--model {value} is a file, not a folder; pass the folder that holds config.json or a repo id")
        if not directory.is_dir():
            raise HubError(f"{value}: no such folder, and not a Hugging Face repo id (org/name); "
                           "pass the folder that holds config.json or a repo id")
        return ModelSource(directory, directory.resolve().name)
    directory = _download(value, revision, weights)
    _check_complete(value, directory, weights)
    return ModelSource(directory, value.split("/")[1], repo_id=value, commit=directory.name)


def _download(repo_id: str, revision: str | None, weights: bool) -> Path:
    try:  # huggingface_hub parses its HF_* variables on import (HF_HUB_ETAG_TIMEOUT=abc is a ValueError)
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ValueError as e:
        raise HubError(f"huggingface_hub cannot start with this environment ({e}); fix or unset the HF_* "
                       "variables, or pass a local folder") from None
    if not re.match(r"https?://[^/]", str(constants.ENDPOINT)):
        raise HubError(f"HF_ENDPOINT {constants.ENDPOINT!r} is not an http(s) URL; fix or unset it, or pass a local folder")

    patterns = list(RUNTIME_FILES) + (list(WEIGHT_FILES) if weights else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=list(SUBFOLDERS)))
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, "
                       "then log in with `hf auth login` or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision}; pass a branch, tag or commit that exists") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repo on the Hugging Face Hub, or a private one you cannot see; "
                       "check the id, log in with `hf auth login` or set HF_TOKEN, or pass a local folder") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                           "is set: download it once with network access, or pass a local folder") from None
        raise HubError(f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) and {repo_id} is not in the cache "
                       f"({constants.HF_HUB_CACHE}): check the network, proxy or HF_ENDPOINT, or pass a local folder") from None
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"the Hugging Face Hub refused {repo_id} ({first}); try again later or pass a local folder") from None
    except OSError as e:  # the cache or token under HF_HOME: not a folder, not writable, full (the Hub's own
        # errors, some of them OSErrors, are caught above)
        where = e.filename or constants.HF_HUB_CACHE
        raise HubError(f"cannot use the Hugging Face cache at {where} ({e.strerror or e}); set HF_HOME (or "
                       "HF_HUB_CACHE) to a writable folder, or pass a local folder") from None


def _check_complete(repo_id: str, directory: Path, weights: bool) -> None:
    """Offline, huggingface_hub returns a cached snapshot as it is; say which part is missing."""
    from huggingface_hub import constants

    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if weights and not any((directory / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("the safetensors weights")
    if missing:
        fix = ("HF_HUB_OFFLINE is set: download it once with network access" if constants.HF_HUB_OFFLINE
               else "is it an mllama checkpoint in safetensors?")
        raise HubError(f"the cached snapshot of {repo_id} ({directory}) lacks {' and '.join(missing)}; {fix}")
