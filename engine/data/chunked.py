"""Resumable chunked work: each chunk's result is saved as parquet, so a re-run after a crash
skips what is done. The cache folder is keyed by the caller (a stage's content hash), so a
changed input never reuses a stale chunk."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def save_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` atomically: a crash mid-write leaves no half-written file under that name."""
    partial = path.with_suffix(".partial")
    frame.to_parquet(partial, index=False)
    partial.replace(path)


def map_in_chunks(
    items: pd.DataFrame,
    work: Callable[[pd.DataFrame], pd.DataFrame],
    *,
    cache: Path,
    chunk_size: int,
    desc: str,
) -> pd.DataFrame:
    """Apply `work` to consecutive chunks of `items`, caching each result; concat in order."""
    cache.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(items), chunk_size)
    done = sum(1 for s in starts if (cache / f"chunk-{s // chunk_size:05d}.parquet").is_file())
    if done:
        logger.info("%s: resuming, %d of %d chunks already done", desc, done, len(starts))
    results = []
    for start in tqdm(starts, desc=desc, unit="chunk"):
        path = cache / f"chunk-{start // chunk_size:05d}.parquet"
        if not path.is_file():
            save_parquet(work(items.iloc[start : start + chunk_size]), path)
        results.append(pd.read_parquet(path))
    return pd.concat(results, ignore_index=True) if results else pd.DataFrame()


def cached_frames(folder: Path, make: Callable[[], dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """`make()`'s named frames, saved in `folder` (one parquet file each); a later call with the same
    folder reads them instead of calling `make` again. Always read back from the files, so a fresh and
    a resumed run return the same frames."""
    done = folder / "done"  # written last: a crash while saving leaves the folder to be made again
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in make().items():
            frame.to_parquet(folder / f"{name}.parquet", index=False)
        done.touch()
    return {path.stem: pd.read_parquet(path) for path in sorted(folder.glob("*.parquet"))}


def map_by_id(
    items: pd.DataFrame,
    work: Callable[[pd.DataFrame], pd.DataFrame],
    *,
    cache: Path,
    chunk_size: int,
    desc: str,
) -> pd.DataFrame:
    """`work` on the rows of `items` (column `id`) whose results (column `prompt_id`) the cache
    folder does not hold yet, chunk by chunk, each chunk saved as it is done; every row's result in
    `items`' order. Unlike map_in_chunks a result is reused by any later set that holds its row,
    e.g. the base model's answers across fine-tunes drawn from one pool."""
    cache.mkdir(parents=True, exist_ok=True)
    held = [pd.read_parquet(path) for path in sorted(cache.glob("part-*.parquet"))]
    done = set().union(*(frame["prompt_id"] for frame in held))
    missing = items[~items["id"].isin(done)]
    if held:
        logger.info("%s: %d of %d already done", desc, len(items) - len(missing), len(items))
    for start in tqdm(range(0, len(missing), chunk_size), desc=desc, unit="chunk"):
        chunk = missing.iloc[start : start + chunk_size]
        result = work(chunk)
        # Named by its rows, so two processes filling one cache never write over each other's parts.
        digest = hashlib.sha256("\n".join(chunk["id"]).encode()).hexdigest()[:16]
        save_parquet(result, cache / f"part-{digest}.parquet")
        held.append(result)
    every = pd.concat(held, ignore_index=True)
    every = every.drop_duplicates("prompt_id").set_index("prompt_id")
    return every.loc[items["id"].to_numpy()].reset_index()
