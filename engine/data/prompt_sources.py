"""Loaders for prompt sets, each returning the one prompt table shape (engine.data.prompts).

A small registry maps a source `type` (as written in a study config) to its loader: builtin,
orbench, refusal_direction, advbench, table (any CSV/JSON/JSONL/TSV with a column mapping), and the
public refusal benchmarks in their published layouts with their own categories (BENCHMARKS:
jailbreakbench, harmbench, strongreject, xstest, sorrybench, catqa, wildjailbreak).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from engine.config_checks import check_choice
from engine.data.paths import BALANCED_PROMPTS, BUILTIN_PROMPTS, cache_dir, public_dataset_dir
from engine.data.prompts import NO_CATEGORY, UNCATEGORIZED, make_prompt_table
from engine.errors import ExplorerError

ORBENCH_REPO = "bench-llm/or-bench"
# OR-Bench's three files: the 80k and hard-1k sets are safe prompts that look toxic.
ORBENCH_FILES: dict[str, str] = {
    "or-bench-80k.csv": "hard",
    "or-bench-hard-1k.csv": "hard",
    "or-bench-toxic.csv": "toxic",
}


def read_table_file(path: Path) -> pd.DataFrame:
    """Read a CSV, JSON list or JSONL file, turning parser failures into one clear error."""
    if not path.is_file():
        raise ExplorerError(f"Prompt file {path} does not exist.", "check the path in the config.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""],
                               sep="\t" if suffix == ".tsv" else ",")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise ExplorerError(
            f"Malformed {suffix[1:].upper()} file {path}: {str(exc).splitlines()[0]}",
            "fix the file (quote fields that contain commas or newlines; UTF-8 encoding).",
        ) from exc
    raise ExplorerError(f"Unsupported prompt file type {path.name}.", "use .csv, .tsv, .json or .jsonl.")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold the text, category, kind and split; constants where a column is absent."""

    text: str = "text"
    category: str | None = None
    kind: str | None = None
    split: str | None = None
    default_category: str = UNCATEGORIZED
    default_kind: str = "toxic"


def load_table(
    path: str | Path,
    mapping: ColumnMapping | None = None,
    *,
    source: str | None = None,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """Any CSV/JSON/JSONL prompt file, mapped onto the prompt table."""
    path = Path(path)
    mapping = mapping or ColumnMapping()
    raw = read_table_file(path)
    where = str(path)
    wanted = [c for c in (mapping.text, mapping.category, mapping.kind, mapping.split) if c]
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise ExplorerError(
            f"{where} lacks column(s) {missing}; it has {list(raw.columns)}.",
            "fix the column mapping in the config (text/category/kind/split) or the file header.",
        )
    frame = pd.DataFrame({"text": raw[mapping.text]})
    frame["category"] = raw[mapping.category] if mapping.category else mapping.default_category
    frame["kind"] = raw[mapping.kind] if mapping.kind else mapping.default_kind
    if mapping.split:
        frame["split"] = raw[mapping.split]
    return make_prompt_table(
        frame, source=source or path.stem, test_fraction=test_fraction, where=where
    )


BuiltinVariant = Literal["original", "balanced"]
BUILTIN_VARIANTS: dict[BuiltinVariant, Path] = {"original": BUILTIN_PROMPTS, "balanced": BALANCED_PROMPTS}


def load_builtin(test_fraction: float = 0.3, variant: BuiltinVariant = "original") -> pd.DataFrame:
    """The project's own prompt set: ten OR-Bench categories x toxic/hard, plus safe prompts.
    `balanced`: the same set with the safe prompts phrased like the toxic ones (same openers)."""
    check_choice("builtin", "variant", variant, BuiltinVariant)
    return load_table(
        BUILTIN_VARIANTS[variant],
        ColumnMapping(category="category", kind="kind"),
        source="builtin",
        test_fraction=test_fraction,
    )


def _orbench_file(location: str, filename: str) -> Path:
    if location == "hub":
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(ORBENCH_REPO, filename, repo_type="dataset"))
        except Exception as exc:  # the hub client raises many types; all mean "not reachable"
            raise ExplorerError(
                f"Could not fetch {filename} from the hub dataset {ORBENCH_REPO}: {exc}",
                "download OR-Bench's CSVs and set `location:` to their folder.",
            ) from exc
    return Path(location) / filename


def load_orbench(
    location: str = "hub",
    files: tuple[str, ...] = tuple(ORBENCH_FILES),
    *,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """OR-Bench's CSVs (`prompt,category`) from a local folder or from the hub."""
    unknown = sorted(set(files) - set(ORBENCH_FILES))
    if unknown:
        raise ExplorerError(
            f"Unknown OR-Bench file(s) {unknown}.", f"use some of {', '.join(ORBENCH_FILES)}."
        )
    tables = [
        load_table(
            _orbench_file(location, name),
            ColumnMapping(text="prompt", category="category", default_kind=ORBENCH_FILES[name]),
            source=name.removesuffix(".csv"),
            test_fraction=test_fraction,
        )
        for name in files
    ]
    return pd.concat(tables).drop_duplicates("id", keep="first").reset_index(drop=True)


REFUSAL_DIRECTION_URL = "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset/splits/{}.json"
REFUSAL_DIRECTION_FILES: dict[str, tuple[str, str]] = {  # file stem -> (kind, split)
    "harmful_train": ("toxic", "train"),
    "harmful_val": ("toxic", "test"),
    "harmless_train": ("safe", "train"),
    "harmless_val": ("safe", "test"),
}


def refusal_direction_file(folder: str | Path, stem: str) -> Path:
    """One of refusal_direction's split files: in `folder`, or with folder `auto` in a local copy
    (engine.data.paths.public_dataset_dir) else downloaded once from the project's GitHub repository."""
    if str(folder) != "auto":
        return Path(folder) / f"{stem}.json"
    return local_or_downloaded("refusal_direction", f"{stem}.json", REFUSAL_DIRECTION_URL.format(stem),
                               "download dataset/splits/ from github.com/andyrdt/refusal_direction and set `folder:` "
                               "to it")


def local_or_downloaded(dataset: str, filename: str, url: str, fix: str) -> Path:
    """A public set's file for location `auto`: a local copy (engine.data.paths.public_dataset_dir), else
    downloaded once from `url`; `fix` says how to get it by hand when the download fails."""
    local = public_dataset_dir(dataset)
    if local is not None:
        return local / filename
    return downloaded(url, dataset, f"{fix} (or $REFUSAL_EXPLORER_DATASETS to the folder holding {dataset}/).")


def downloaded(url: str, dataset: str, fix: str) -> Path:
    """A published file, downloaded once into the cache (users have the network; tests use local copies)."""
    target = cache_dir() / "datasets" / dataset / url.rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial_file = target.with_suffix(".partial")
        try:
            urllib.request.urlretrieve(url, partial_file)
        except OSError as exc:
            raise ExplorerError(f"Could not download {url}: {exc}", fix) from exc
        partial_file.replace(target)
    return target


def load_refusal_direction(
    folder: str | Path = "auto",
    *,
    files: tuple[str, ...] = tuple(REFUSAL_DIRECTION_FILES),
    max_per_file: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """refusal_direction's JSON splits: harmful_* are toxic, harmless_* are safe; val -> test.
    `max_per_file` keeps each file's first rows, `sample` a seeded random sample of each file."""
    unknown = sorted(set(files) - set(REFUSAL_DIRECTION_FILES))
    if unknown:
        raise ExplorerError(f"Unknown refusal_direction file(s) {unknown}.",
                            f"use some of {', '.join(REFUSAL_DIRECTION_FILES)}.")
    tables = []
    for stem in files:
        kind, split = REFUSAL_DIRECTION_FILES[stem]
        path = refusal_direction_file(folder, stem)
        raw = read_table_file(path)
        if "instruction" not in raw.columns:
            raise ExplorerError(
                f"{path} lacks the 'instruction' field.",
                "use the files from refusal_direction's dataset/splits/ folder.",
            )
        raw = seeded_sample(raw.head(max_per_file) if max_per_file else raw, sample, seed)
        # harmful_val carries HarmBench-style categories, kept as they are; harmful_train has none.
        categories = raw.get("category", pd.Series([None] * len(raw), index=raw.index))
        frame = pd.DataFrame(
            {
                "text": raw["instruction"].to_numpy(),
                "category": categories.fillna(UNCATEGORIZED if kind == "toxic" else NO_CATEGORY).to_numpy(),
                "kind": kind,
                "split": split,
            }
        )
        tables.append(
            make_prompt_table(
                frame, source=f"refusal_direction/{path.stem}", test_fraction=test_fraction, where=str(path),
            )
        )
    return pd.concat(tables).drop_duplicates("id", keep="first").reset_index(drop=True)


def seeded_sample(raw: pd.DataFrame, sample: int | None, seed: int) -> pd.DataFrame:
    """A seeded random sample of `sample` rows in file order (all of them when None or more than there are)."""
    if sample is None or sample >= len(raw):
        return raw
    return raw.sample(n=sample, random_state=seed).sort_index()


ADVBENCH_URL = "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv"


def advbench_file(path: str | Path) -> Path:
    """AdvBench's harmful_behaviors.csv: `path` itself (or the file in that folder), or with `auto` a local
    copy (engine.data.paths.public_dataset_dir) else downloaded once from the llm-attacks repository."""
    if str(path) != "auto":
        path = Path(path)
        return path / "harmful_behaviors.csv" if path.is_dir() else path
    return local_or_downloaded("advbench", "harmful_behaviors.csv", ADVBENCH_URL,
                               "download data/advbench/harmful_behaviors.csv from github.com/llm-attacks/llm-attacks "
                               "and set `path:` to it")


def load_advbench(path: str | Path = "auto", *, sample: int | None = None, seed: int = 0,
                  test_fraction: float = 0.3) -> pd.DataFrame:
    """AdvBench's harmful_behaviors.csv (`goal,target`): every goal is a toxic prompt; `sample` keeps a
    seeded random sample of them."""
    prompts = load_table(advbench_file(path), ColumnMapping(text="goal"), source="advbench",
                         test_fraction=test_fraction)
    return seeded_sample(prompts, sample, seed).reset_index(drop=True)


def _kinds(values: dict[str, str], column: str) -> Callable[[pd.DataFrame], pd.Series]:
    """Kinds read from a column through `values`; a value not listed is left as is, so the prompt
    table's kind check names it."""
    return lambda raw: raw[column].astype(str).str.strip().str.lower().map(
        lambda v: values.get(v, v), na_action="ignore")  # a missing value stays missing


def _with_context(raw: pd.DataFrame) -> pd.Series:
    """HarmBench's contextual behaviors: the context, then the request, as HarmBench's own prompt does."""
    context = raw["ContextString"].fillna("").astype(str).str.strip()
    return context.where(context == "", context + "\n\n---\n\n") + raw["Behavior"]


def _first_turn(turns: list[str]) -> str:
    return turns[0]


@dataclass(frozen=True)
class BenchmarkLayout:
    """A public benchmark's published file layout: the columns it must have and what they hold."""

    files: dict[str, str]  # file name -> the kind of its prompts ("" when a column says it)
    columns: tuple[str, ...]
    text: Callable[[pd.DataFrame], pd.Series]
    category: str | None = None
    kind: Callable[[pd.DataFrame], pd.Series] | None = None
    url: str = ""  # where each file is published, with {} for the file name ("" when the set is gated)
    filters: dict[str, str] = field(default_factory=dict)  # option -> the column it filters on


BENCHMARKS: dict[str, BenchmarkLayout] = {
    # JBB-Behaviors: 100 harmful behaviors and 100 benign ones on the same topics (safe, sound harmful).
    "jailbreakbench": BenchmarkLayout(
        {"harmful-behaviors.csv": "toxic", "benign-behaviors.csv": "hard"}, ("Goal", "Category"),
        lambda raw: raw["Goal"], category="Category",
        url="https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors/resolve/main/data/{}"),
    "harmbench": BenchmarkLayout(
        {"harmbench_behaviors_text_all.csv": "toxic"},
        ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString"), _with_context,
        category="SemanticCategory",
        url="https://raw.githubusercontent.com/centerforaisafety/HarmBench/main/data/behavior_datasets/{}",
        filters={"functional_categories": "FunctionalCategory"}),
    "strongreject": BenchmarkLayout(
        {"strongreject_dataset.csv": "toxic"}, ("category", "forbidden_prompt"), lambda raw: raw["forbidden_prompt"],
        category="category",
        url="https://raw.githubusercontent.com/alexandrasouly/strongreject/main/strongreject_dataset/{}"),
    # XSTest: safe prompts that sound unsafe (hard) and their unsafe contrasts (toxic); `type` is the category.
    "xstest": BenchmarkLayout(
        {"xstest_prompts.csv": ""}, ("prompt", "type", "label"), lambda raw: raw["prompt"], category="type",
        kind=_kinds({"safe": "hard", "unsafe": "toxic"}, "label"),
        url="https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/main/{}"),
    # SORRY-Bench (gated on the hub): one JSON line per request, the text in `turns`, 44-45 numbered categories.
    "sorrybench": BenchmarkLayout(
        {"question.jsonl": "toxic"}, ("category", "turns"), lambda raw: raw["turns"].map(_first_turn),
        category="category", filters={"prompt_styles": "prompt_style"}),
    "catqa": BenchmarkLayout(
        {"catqa_english.json": "toxic"}, ("Category", "Subcategory", "Question"), lambda raw: raw["Question"],
        category="Category"),
    # WildJailbreak-style files: the adversarial text where there is one, else the vanilla one.
    "wildjailbreak": BenchmarkLayout(
        {"eval.tsv": ""}, ("adversarial", "data_type"),
        lambda raw: raw["adversarial"].where(raw["adversarial"].fillna("").str.strip() != "",
                                             raw.get("vanilla", raw["adversarial"])),
        kind=lambda raw: raw["data_type"].fillna("").str.strip().str.lower().map(
            lambda v: "toxic" if v.endswith("_harmful") else "hard" if v.endswith("_benign") else v,
            na_action="ignore")),
}


def benchmark_file(name: str, location: str, filename: str) -> Path:
    """One of a benchmark's files: in the folder `location`, `location` itself when it is that file,
    or with `hub` downloaded once from where the set is published."""
    if location != "hub":
        path = Path(location)
        return path if path.is_file() else path / filename
    layout = BENCHMARKS[name]
    if not layout.url:
        raise ExplorerError(f"{name} is gated: it cannot be downloaded without an account.",
                            f"download {filename} from its page and set `path:` to it or to its folder.")
    return downloaded(layout.url.format(filename), name, f"download {filename} and set `path:` to its folder.")


def load_benchmark(name: str, path: str = "hub", *, files: tuple[str, ...] | None = None,
                   test_fraction: float = 0.3, **filters: list[str]) -> pd.DataFrame:
    """A public benchmark in its published layout, with its own categories and kinds."""
    layout = BENCHMARKS[name]
    files = tuple(files or layout.files)
    if unknown := sorted(set(files) - set(layout.files)):
        raise ExplorerError(f"Unknown {name} file(s) {unknown}.", f"use some of {', '.join(layout.files)}.")
    if unknown := sorted(set(filters) - set(layout.filters)):
        raise ExplorerError(f"Unknown {name} option(s) {unknown}.",
                            f"use {', '.join(layout.filters) or 'no filter option'} (and path, files).")
    tables = []
    for filename in files:
        file = benchmark_file(name, path, filename)
        raw = read_table_file(file)
        if missing := [c for c in layout.columns if c not in raw.columns]:
            raise ExplorerError(
                f"{file} is not in {name}'s published layout: it lacks column(s) {missing} "
                f"(expected {list(layout.columns)}; it has {list(raw.columns)}).",
                f"use {name}'s file as published, or the `table` source with a column mapping.")
        for option, values in filters.items():
            raw = raw[raw[layout.filters[option]].isin(values)]
        frame = pd.DataFrame({
            "text": layout.text(raw),
            "category": raw[layout.category] if layout.category else UNCATEGORIZED,
            "kind": layout.kind(raw) if layout.kind else layout.files[filename]})
        tables.append(make_prompt_table(frame, source=f"{name}/{Path(filename).stem}", test_fraction=test_fraction,
                                        where=str(file)))
    return pd.concat(tables).drop_duplicates("id", keep="first").reset_index(drop=True)


PROMPT_SOURCES: dict[str, Callable[..., pd.DataFrame]] = {
    "builtin": load_builtin,
    "orbench": load_orbench,
    "refusal_direction": load_refusal_direction,
    "advbench": load_advbench,
    "table": load_table,
    **{name: partial(load_benchmark, name) for name in BENCHMARKS},
}


def mapped_categories(prompts: pd.DataFrame, category_map: dict[str, str], where: str) -> pd.DataFrame:
    """A source's category names mapped onto another taxonomy (names not in the map are kept)."""
    if not isinstance(category_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in category_map.items()):
        raise ExplorerError(f"category_map of {where} is not a mapping of category names to category names.",
                            "write it as {their_name: your_name, ...}.")
    renamed = prompts["category"].map(lambda c: category_map.get(c, c), na_action="ignore")  # NA stays NA
    return prompts.assign(category=renamed.astype("string"))


def load_prompt_source(spec: dict[str, Any], *, test_fraction: float) -> pd.DataFrame:
    """Load one `{type: ..., **options}` entry of a study config's `prompts.sources` list.
    `category_map` (any type) renames the set's categories, to compare it with another taxonomy."""
    options = dict(spec)
    kind = options.pop("type", None)
    category_map = options.pop("category_map", None)
    if kind not in PROMPT_SOURCES:
        raise ExplorerError(
            f"Unknown prompt source type {kind!r}.", f"use one of {', '.join(PROMPT_SOURCES)}."
        )
    if kind == "table" and isinstance(options.get("mapping"), dict):
        options["mapping"] = ColumnMapping(**options["mapping"])
    if (kind in ("orbench", "refusal_direction") or kind in BENCHMARKS) and "files" in options:
        options["files"] = tuple(options["files"])
    try:
        prompts = PROMPT_SOURCES[kind](**options, test_fraction=test_fraction)
    except TypeError as exc:
        raise ExplorerError(
            f"Bad options for prompt source {kind!r}: {exc}.",
            "see the loader's arguments in engine/data/prompt_sources.py.",
        ) from exc
    return prompts if category_map is None else mapped_categories(prompts, category_map, f"source {kind!r}")
