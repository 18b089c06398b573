"""The Hugging Face Hub as a source of models and pair caches: repo ids, and downloads that fail in one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nfm.core.errors import NFMError


def is_repo_id(text: str) -> bool:
    """owner/name, not a relative or absolute path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def hub_snapshot(repo_id: str, revision: str | None, repo_type: str | None = None) -> Path:
    """A Hub repo downloaded (or found in the local Hub cache); one line with the way out when it cannot be."""
    from huggingface_hub import snapshot_download

    try:
        kw = {"repo_type": repo_type} if repo_type else {}
        return Path(snapshot_download(repo_id=repo_id, revision=revision, **kw))
    except Exception as e:  # offline, unknown repo, no access
        raise NFMError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "pass a local directory instead, or check the repo id and your network / HF_HUB_OFFLINE"
        ) from e


def local_or_hub(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local path as it is; otherwise a Hub repo id, downloaded (or found in the local Hub cache)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    text = str(path_or_repo)
    if not is_repo_id(text):
        raise NFMError(f"{text} is neither a local directory nor a Hugging Face Hub repo id (owner/name)")
    return hub_snapshot(text, revision)


@contextmanager
def hub_upload(repo_id: str) -> Iterator[None]:
    """An upload to the Hub that fails in one line (offline, refused, not logged in, no write access), as a
    download does, not with the HTTP library's exception."""
    try:
        yield
    except NFMError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise NFMError(
            f"could not push to {repo_id!r} on the Hugging Face Hub ({type(e).__name__}: {first}); check your "
            "network (and HF_HUB_OFFLINE), that you are logged in with write access (huggingface-cli login, or "
            "HF_TOKEN), and the repo id"
        ) from e
