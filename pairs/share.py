"""Sharing a pair cache: push it to a Hugging Face Hub dataset repo, and install a downloaded one.

A cache is content-addressed (its key names everything that determined the pairs) and every shard has its
sha256 and xxh3-128 in the index, so sharing needs no new format: the repo holds the index and the shards as
they are, plus a dataset card. Installing checks every byte against the index before the cache appears
under its key in the cache root, where `nfm student train --pairs KEY` finds it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from nfm.core.errors import NFMError
from nfm.core.hub import hub_upload
from nfm.core.io import write_json
from nfm.pairs.format import (
    INDEX_NAME,
    KINDS,
    ORIGIN_NAME,
    cache_files,
    cache_kind,
    check_index,
    check_key,
    read_index,
    require_kind,
    safe_member,
)

_CARD_WORDS = {
    "teacher": "Noise/data pairs of a normalizing-flow teacher",
    "reflow": "Noise/data pairs of a flow-matching student (reflow)",
    "kt": "A classifier's logits per image view (FM-KT)",
}


def dataset_card(index: dict[str, Any], repo_id: str) -> str:
    teacher, data = index.get("teacher") or {}, index.get("data") or {}
    kind = cache_kind(index)
    sigma = f"; σ_f = {index['sigma_f']}" if "sigma_f" in index else ""
    train = (
        f"nfm kt student train --pairs {index['key'][:8]}"
        if kind == "kt"
        else f"nfm student train --pairs {index['key'][:8]}"
    )
    shape = "×".join(str(s) for s in (index.get("shapes") or {}).get("data", []))
    return f"""---
tags:
- nfm
- normalized-flow-matching
---
# NFM pair cache `{index["key"]}`

{_CARD_WORDS.get(kind, kind)}, in NFM's sharded safetensors format
(`pairs.index.json` declares the kind and columns and describes every shard, with its sha256 and xxh3-128).

- pairs: {index.get("total_rows")} ({len(index["shards"])} shards), images {shape or "?"}
- teacher: `{teacher.get("fingerprint", teacher.get("source", "?"))}`
- data: `{data.get("name", "?")}`{sigma}

```python
import nfm
pairs = nfm.PairCache.from_pretrained("{repo_id}")   # checked byte for byte, installed under its key
ds = pairs.to_dataset()
```
or `nfm pairs pull {repo_id}`, then `{train}`.
"""


def check_complete(cache_dir: Path, index: dict[str, Any], what: str) -> None:
    """Every claim of the index holds, content included (sha256 and xxh3 of every shard)."""
    if not index.get("complete"):
        raise NFMError(f"{what} {cache_dir} is incomplete; finish it with `nfm pairs build` first")
    problems = check_index(cache_dir, index, content=True)
    if problems:
        raise NFMError(
            f"{what} {cache_dir} does not match its index: {'; '.join(problems[:3])}; nothing was shared or "
            "installed. Pull or rebuild it"
        )


def install_cache(src: Path, root: Path, origin: str | None = None) -> Path:
    """Install the cache in `src` (e.g. a Hub snapshot, whose files are links into a blob store) as `root/KEY`:
    its files are copied (hard-linked where possible) into a hidden directory, every byte there is checked
    against the index, and only then does the directory take its key's name (one rename: the cache appears
    complete or not at all). An installed cache of the same key is kept once its shards match.

    The installed cache is marked foreign (ORIGIN_NAME: `origin`, e.g. "hub:owner/name@revision"): every byte
    matches its index and its key matches its key fields, but nothing yet shows that the pairs are what the
    teacher named there makes. `nfm pairs verify KEY --teacher SPEC` checks that and clears the mark; a build
    with that teacher checks it the same way before reusing it."""
    src, root = Path(src), Path(root)
    index = read_index(src)
    key = check_key(src, index)  # the key is the hash of the index's key fields: a download cannot claim another
    require_kind(src, index, KINDS, "nfm pairs pull")
    dst = root / key
    if (dst / INDEX_NAME).is_file():
        if read_index(dst).get("shards") != index.get("shards"):
            raise NFMError(
                f"a different pair cache is installed as {key} in {root} (its shards differ from the download's); "
                f"check it with `nfm pairs verify {key}` or remove it (`nfm pairs rm {key}`), then pull again"
            )
        return dst
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.install-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = [INDEX_NAME] + [safe_member(tmp, s["file"]).name for s in index.get("shards", [])]
        for name in names:
            real = (src / name).resolve()
            if not real.is_file():
                raise NFMError(f"the downloaded pair cache {src} lacks {name}, which its index names")
            try:
                os.link(real, tmp / name)
            except OSError:
                shutil.copyfile(real, tmp / name)
        check_complete(tmp, index, f"the pair cache downloaded to {src}, checked in")
        # foreign until `nfm pairs verify --teacher` (or a build with the teacher) checks it against the pairs'
        # own generator: its bytes match its index, but who wrote the index is unknown
        write_json(tmp / ORIGIN_NAME, {"source": origin or str(src), "installed": time.time(), "verified": None})
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def push_cache(cache_dir: Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Upload a verified cache (index, shards, a dataset card) to the Hub dataset repo `repo_id` in one
    commit, the files read where they are (no copy). Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    index = read_index(cache_dir)
    check_complete(cache_dir, index, "pair cache")
    ops = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in cache_files(cache_dir, index)]
    card = dataset_card(index, repo_id).encode()
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi()
    with hub_upload(repo_id):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.create_commit(
            repo_id=repo_id,
            repo_type="dataset",
            operations=ops,
            commit_message=commit_message or f"nfm pair cache {index['key']}",
        )
    return str(getattr(info, "commit_url", info))
