"""Where pair caches live and how a key, a key prefix or a path finds one (the student uses this too)."""

from __future__ import annotations

import os
from pathlib import Path

from nfm.pairs.format import INDEX_NAME
from nfm.pipeline.core.errors import NFMError


def default_cache_root() -> Path:
    """$NFM_CACHE_DIR/pairs, or ~/.cache/nfm/pairs."""
    return Path(os.environ.get("NFM_CACHE_DIR", Path.home() / ".cache" / "nfm")) / "pairs"


def find_cache(key_or_path: str, root: Path | None = None) -> Path:
    """A cache directory from a path, a key, or a unique key prefix (under `root`, default the cache root)."""
    root = Path(root) if root is not None else default_cache_root()
    p = Path(key_or_path).expanduser()
    if (p / INDEX_NAME).is_file():
        return p
    if (root / key_or_path / INDEX_NAME).is_file():
        return root / key_or_path
    if len(key_or_path) < 4 or not all(c in "0123456789abcdef" for c in key_or_path):
        raise NFMError(
            f"{key_or_path!r} is neither a cache directory nor a key: give a cache key or a prefix of at least "
            "4 of its hex characters (`nfm pairs ls` lists them)"
        )
    matches = sorted(d for d in root.glob(f"{key_or_path}*") if (d / INDEX_NAME).is_file()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise NFMError(
            f"key prefix {key_or_path!r} matches {len(matches)} caches: "
            f"{', '.join(m.name for m in matches)}; give more of the key"
        )
    raise NFMError(
        f"no pair cache {key_or_path!r} under {root}; `nfm pairs ls` lists the caches there "
        "(--cache-dir chooses another root)"
    )
