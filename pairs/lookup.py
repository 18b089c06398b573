"""Where pair caches live and how a key, a key prefix or a path finds one (the student uses this too)."""

from __future__ import annotations

import os
from pathlib import Path

from nfm.core.errors import NFMError
from nfm.pairs.format import INDEX_NAME, KEY_RE, ORIGIN_NAME, SHARD_RE, is_build_leftover, read_index


def default_cache_root() -> Path:
    """$NFM_CACHE_DIR/pairs, or ~/.cache/nfm/pairs."""
    return Path(os.environ.get("NFM_CACHE_DIR", Path.home() / ".cache" / "nfm")) / "pairs"


def cache_ref(path_or_key: str) -> str:
    """What an export records of the pair cache it was trained on: the key of a cache directory (find_cache finds
    it under any machine's cache root, and no local path is published with the export); anything else as given."""
    name = Path(path_or_key).name
    return name if KEY_RE.match(name) else path_or_key


def find_cache(key_or_path: str, root: Path | None = None) -> Path:
    """A cache directory from a path, a key, or a unique key prefix (under `root`, default the cache root)."""
    root = Path(root) if root is not None else default_cache_root()
    if not key_or_path.strip():
        raise NFMError("no cache named: give a cache key, a prefix of at least 4 of its hex characters, or a path")
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


def _cache_file(name: str) -> bool:
    """A file name a cache directory holds: its index, shards, origin record, or a killed build's temp file."""
    return name in (INDEX_NAME, ORIGIN_NAME) or bool(SHARD_RE.match(name)) or is_build_leftover(name)


def removable_cache(key_or_path: str, root: Path | None = None) -> Path:
    """The cache directory `nfm pairs rm` may delete: a key or key prefix under `root`, or a path naming such a
    directory. Anything else is refused: a directory outside the cache root, one whose name is not a key, or one
    whose index names another key is not a cache of this root, whatever files it holds."""
    root = Path(root) if root is not None else default_cache_root()
    cache_dir = find_cache(key_or_path, root)
    if not root.is_dir() or cache_dir.resolve().parent != root.resolve():
        raise NFMError(
            f"{cache_dir} is not a cache under the cache root {root}: nfm pairs rm removes only caches there "
            "(--cache-dir chooses the root); remove other directories yourself"
        )
    if cache_dir.is_symlink() or not KEY_RE.match(cache_dir.name):
        raise NFMError(f"{cache_dir} is not named by a cache key (20 hex characters): not removed")
    try:
        named = read_index(cache_dir).get("key")
    except NFMError:
        named = cache_dir.name  # an unreadable index: the directory's name and files still say what it is
    if named != cache_dir.name:
        raise NFMError(f"{cache_dir}'s index names key {named!r}, not {cache_dir.name}: not a cache; not removed")
    return cache_dir


def remove_cache(cache_dir: Path) -> list[str]:
    """Delete the files a cache consists of (index, shards, origin, a killed build's temp files), then the
    directory if nothing else is left in it. Returns the names of what was left (other files are never
    touched)."""
    left = []
    for f in sorted(cache_dir.iterdir()):
        if (f.is_file() or f.is_symlink()) and _cache_file(f.name):
            f.unlink()
        else:
            left.append(f.name)
    if not left:
        cache_dir.rmdir()
    return left
