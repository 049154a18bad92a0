"""Fetches a checkpoint from the Hugging Face hub with huggingface_hub: only what a store needs
(safetensors, index, config, generation config, tokenizer files; never pickles or `consolidated.*`
duplicates), into the standard hub cache (HF_HOME). huggingface_hub 2.4 resumes a dropped connection
within the same run (Range request from the last whole 10 MiB chunk) and keeps finished files in the
cache, so a rerun after a failure fetches only what is missing (partial files are not kept).
`download_config` fetches only config.json (for `adapmoe fit`). Honours HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE. Nothing else in adapmoe touches the network."""

from __future__ import annotations

import re
from pathlib import Path

from adapmoe_cli.errors import DownloadError

ALLOW = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
]
IGNORE = ["*/*", "*.bin", "*.pt", "*.pth", "consolidated.*", "*.msgpack", "*.h5", "*.onnx", "*.gguf"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/")) and ".." not in text


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the hub cache) the files of `repo_id` a store needs; return the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not looks_like_repo_id(repo_id):
        raise DownloadError(f"{repo_id!r} is not a hub model id (expected ORG/NAME, e.g. mistralai/Mixtral-8x7B-v0.1)")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    except GatedRepoError:
        raise DownloadError(
            f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise DownloadError(
            f"{repo_id} was not found on the hub (or is private: set HF_TOKEN); check the spelling"
        ) from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise DownloadError(
            f"{repo_id} is not in the local hub cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set or the network is down)"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise DownloadError(f"{repo_id}: the hub refused the token (401); check HF_TOKEN") from None
        raise DownloadError(f"downloading {repo_id} failed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise DownloadError(f"downloading {repo_id} failed: {e}") from None
    except Exception as e:  # the HTTP client's own errors (a connection cut mid-file) are not OSErrors
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "httpcore2", "h11"):
            raise
        raise DownloadError(f"downloading {repo_id} failed: {e}; run the command again to fetch what is "
                            "missing") from None
    return Path(path)


def download_config(repo_id: str, revision: str | None = None) -> dict:
    """Only `config.json` of a hub model (for `adapmoe fit`: sizes before any weight is downloaded)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if not looks_like_repo_id(repo_id):
        raise DownloadError(f"{repo_id!r} is not a hub model id (expected ORG/NAME, e.g. mistralai/Mixtral-8x7B-v0.1)")
    from adapmoe_cli.safe_io import MAX_DOC_BYTES, parse_json, read_capped

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
        what = f"{repo_id}'s config.json"
        data = parse_json(read_capped(Path(path), MAX_DOC_BYTES, what, DownloadError, follow=True), what, DownloadError)
    except GatedRepoError:
        raise DownloadError(f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{repo_id} was not found on the hub (or is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise DownloadError(f"{repo_id}'s config is not in the local hub cache and the hub cannot be reached") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"fetching {repo_id}'s config failed: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise DownloadError(f"fetching {repo_id}'s config failed: {e}") from None
    if not isinstance(data, dict):
        raise DownloadError(f"{repo_id}'s config.json is not a JSON object")
    return data
