"""Share a trained checkpoint on the Hugging Face Hub: one commit with everything needed to use and judge it.

A checkpoint folder written by training (`seqrec_hf.train`) or fine-tuning holds the weights (safetensors),
`config.json` and the item tokenizer (with `auto_map` and the code files for `trust_remote_code=True`),
`metrics.json`, `train_log.jsonl`, the training curve and the model card (`README.md`). `push_checkpoint`
uploads those, and leaves out training leftovers (resumable `checkpoints/`, `best_model/`, temporary files).

    from seqrec_hf.hub import push_checkpoint
    push_checkpoint("outputs/run", "my-org/seqrec-beauty")              # seqrec-hf push outputs/run --repo-id ...
    # anyone, anywhere:
    pipeline("next-item-recommendation", model="my-org/seqrec-beauty")   # after `import seqrec_hf`
    AutoModelForCausalLM.from_pretrained("my-org/seqrec-beauty", trust_remote_code=True)

Errors from the Hub become a `HubPushError` whose message names the repository and what to do; the token
never appears in it. The local folder is only read, never changed, whatever happens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

logger = logging.getLogger(__name__)

# Training leftovers that are not part of a shared model (fnmatch patterns on paths relative to the folder;
# `*` crosses folder boundaries, as in huggingface_hub).
IGNORE_PATTERNS = [
    "checkpoints/*",  # Accelerate states for --resume: optimizer moments, RNG states
    "checkpoint-*/*",  # the same for Trainer runs (fine-tuning)
    "best_model/*",  # a copy of the weights already at the top level
    "*.tmp",
    "*.tmp/*",
    "*.tmpdir/*",
    "*.old/*",
    "runs/*",
    "__pycache__/*",
    "*.pyc",
    ".ipynb_checkpoints/*",
    ".git/*",
    ".cache/*",
]
REQUIRED_FILES = ("config.json", "tokenizer_config.json", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKEN_HELP = "pass token=..., set the HF_TOKEN environment variable, or run `hf auth login`"


class HubPushError(RuntimeError):
    """Pushing to the Hub failed; the message says why and what to do (and never contains the token)."""


def files_to_push(folder: str | os.PathLike) -> list[str]:
    """Paths (relative, POSIX) of the files of a checkpoint folder that `push_checkpoint` uploads."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS))


def check_checkpoint_folder(folder: str | os.PathLike) -> Path:
    """The folder, if it holds a loadable checkpoint (weights, config, tokenizer); else FileNotFoundError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint: missing {', '.join(missing)} "
            "(save both the model and the tokenizer with save_pretrained, or point at a training output_dir)"
        )
    return folder


def render_card_for_repo(folder: str | os.PathLike, repo_id: str, revision: str | None = None) -> bytes | None:
    """The model card as it should read on the Hub (snippets load `repo_id` at `revision`), from metrics.json.

    None when the folder has no metrics.json (its README.md, if any, is then uploaded as it is).
    """
    from .modelcard import render_model_card_for_folder

    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        return None
    name = repo_id.split("/")[-1]
    return render_model_card_for_folder(folder, model_name=name, repo_id=repo_id, revision=revision).encode("utf-8")


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    update_card: bool = True,
) -> CommitInfo:
    """Upload a checkpoint folder to the Hub repository `repo_id` ("org/name") in one commit.

    Creates the repository if needed (`private` applies only then) and the branch `revision` if it does not
    exist yet (from `main`). Files already on the Hub with the same content are skipped, so pushing the same
    folder twice creates no new commit. With `update_card` (default) and a `metrics.json` in the folder, the
    uploaded README.md is the card re-rendered for `repo_id` (the local README.md is left as it is).

    Returns the `huggingface_hub.CommitInfo` (`.oid`, `.commit_url`). Raises `HubPushError` with a message
    that names the repository and the fix; `FileNotFoundError` if the folder is not a complete checkpoint.
    """
    folder = check_checkpoint_folder(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'org/name' (or 'user/name'), got {repo_id!r}")
    token = token or get_token()
    if not token:
        raise HubPushError(f"cannot push to {repo_id}: no Hugging Face token found; {TOKEN_HELP}")
    api = HfApi(token=token)
    where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        card = render_card_for_repo(folder, repo_id, revision) if update_card else None
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
            for path in files_to_push(folder)
            if not (card is not None and path == "README.md")
        ]
        if card is not None:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {folder.resolve().name} with seqrec-hf",
            revision=revision,
        )
    except HTTPError as err:
        raise HubPushError(_explain(err, where, folder, token)) from None
    logger.info("pushed %s to %s at commit %s", folder, where, info.oid)
    return info


def _explain(err: HTTPError, where: str, folder: Path, token: str) -> str:
    """A one-paragraph reason and remedy for a failed push, with the token scrubbed out."""
    endpoint = hub_constants.ENDPOINT
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    server = ""
    if isinstance(err, HfHubHTTPError) and err.server_message:
        server = f" (server said: {err.server_message.strip().splitlines()[0]})"
    intact = f"nothing was committed for this push and the local folder {folder} is unchanged"
    if status == 401:
        message = f"authentication failed pushing to {where} on {endpoint}: the token was rejected (invalid or "
        message += f"expired){server}. Use a token with write access: {TOKEN_HELP}"
    elif status == 403:
        message = f"no write access to {where} on {endpoint}{server}: use a token with write permission on "
        message += f"the namespace {where.split('/')[0]!r} ({TOKEN_HELP})"
    elif isinstance(err, RepositoryNotFoundError):
        message = f"repository {where} not found on {endpoint} and could not be created{server}: check the repo id "
        message += f"and that your token can write to its namespace ({TOKEN_HELP})"
    elif isinstance(err, RevisionNotFoundError):
        message = f"branch of {where} not found on {endpoint}{server}: check --revision"
    elif status is not None and status >= 500:
        message = f"the Hub at {endpoint} failed while uploading to {where}: HTTP {status}{server}. "
        message += f"{intact.capitalize()}; run the same push again (files already uploaded are skipped)"
    elif status is not None:
        message = f"pushing to {where} on {endpoint} failed: HTTP {status}{server}; {intact}"
    else:
        reason = type(err).__name__ + (f": {err}" if str(err) else "")
        message = f"cannot reach the Hub at {endpoint} to push {where} ({reason}); check the network or HF_ENDPOINT"
    return message.replace(token, "***") if token else message


__all__ = ["IGNORE_PATTERNS", "HubPushError", "check_checkpoint_folder", "files_to_push", "push_checkpoint"]
