"""Resumable work cached per prompt id (engine.data.chunked.map_by_id)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from engine.data.chunked import map_by_id


def test_map_by_id_reuses_each_rows_result_in_any_later_set(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def work(chunk: pd.DataFrame) -> pd.DataFrame:
        calls.append(chunk["id"].tolist())
        return pd.DataFrame({"prompt_id": chunk["id"], "answer": chunk["text"].str.upper()})

    first = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    assert map_by_id(first, work, cache=tmp_path, chunk_size=2, desc="t")["answer"].tolist() == ["X", "Y", "Z"]
    assert calls == [["a", "b"], ["c"]]
    second = pd.DataFrame({"id": ["d", "c", "a"], "text": ["w", "z", "x"]})
    result = map_by_id(second, work, cache=tmp_path, chunk_size=2, desc="t")
    assert result["prompt_id"].tolist() == ["d", "c", "a"] and result["answer"].tolist() == ["W", "Z", "X"]
    assert calls[-1] == ["d"]  # only the new row was worked on
