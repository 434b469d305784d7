"""Load forget/retain/holdout/eval splits from the generator, `datasets` (hub or local) or user files.

Every source ends as `{split: [record, ...]}` in the TOFU schema: `question`, `answer` and, when the
source has them, `paraphrased_question`, `paraphrased_answer`, `perturbed_answer` (list of strings) and
`entity`, and for the attack stage's cloze questions `cloze` (a statement with the answer's key value
blanked as ___), `cloze_answer` (that value) and `cloze_wrong` (wrong values); or, for a split of documents
(a text corpus, MUSE's forget and retain sets), `text` and optionally `entity`. `data.columns` maps our column
names to the source's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unlearning.data import synthetic
from unlearning.errors import UserError, raise_if, warn
from unlearning.schema import (
    BUILTIN_PREFIX,
    CHOICE_COLUMNS,
    FILE_SUFFIXES,
    LIST_COLUMNS,
    QA_COLUMNS,
    TEXT_COLUMN,
    DataConfig,
    ExperimentConfig,
    is_file_spec,
)

REQUIRED_COLUMNS = ("question", "answer")


def _hf_split(path: str, spec: str, revision: str | None = None) -> Any:
    """Load `config[:split]` of a hub dataset (at `revision`: a branch, tag or commit) or of a local dataset
    directory (the same call for both)."""
    import datasets

    config, _, split = spec.partition(":")
    local = Path(path)
    try:
        if (local / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
            return datasets.load_from_disk(str(local))[config]
        return datasets.load_dataset(path, name=config or None, split=split or "train", revision=revision)
    except Exception as e:  # datasets raises many types (hub, config, file errors)
        raise UserError(
            f"data.splits: could not load config {config!r} split {split or 'train'!r} of {path!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check the name and config, or "
            "download the dataset and point data.path at the local copy"
        ) from e


BUILTIN_DIR = Path(__file__).parent
BUILTIN_SETS = {  # name -> file shipped in the package, with its licence beside it
    "tofu/real_authors": "tofu/real_authors_perturbed.json",
    "tofu/world_facts": "tofu/world_facts_perturbed.json",
}


def resolve_file(spec: str) -> Path:
    """The file a `data.splits` entry names: a path, or a packaged `builtin:` set."""
    if not spec.startswith(BUILTIN_PREFIX):
        return Path(spec)
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_SETS:
        raise UserError(f"data.splits: unknown packaged set {spec!r}; available: "
                        f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_SETS)}")
    return BUILTIN_DIR / BUILTIN_SETS[name]


def _file_split(spec: str) -> Any:
    import datasets

    path = resolve_file(spec)
    builder = FILE_SUFFIXES[path.suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        where = _bad_json_line(path) if builder == "json" else None
        raise UserError(f"data.splits: could not read {spec!r} as {builder}: "
                        + (where or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from e


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file stops being JSON (datasets' own error names no line), or None."""
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("["):  # one JSON array, not lines
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}"
            if not isinstance(record, dict):
                return f"line {number} is a JSON {type(record).__name__}, not an object with question and answer"
    return None


def _as_list(value: Any) -> list[str]:
    """Perturbed answers may arrive as a list, a JSON list in a string (CSV), or one string."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return [str(v) for v in json.loads(text)]
            except json.JSONDecodeError:
                pass
        return [text] if text else []
    return [str(v) for v in value]


def _blank(value: Any) -> bool:
    """None, NaN (how CSV and Parquet readers give an empty cell) or whitespace only."""
    nan = isinstance(value, float) and value != value
    return value is None or nan or (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str | None:
    """A cell as text: strings as they are, numbers (a CSV reads years as integers) written out; None otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def normalize(rows: list[dict[str, Any]], columns: dict[str, str], split: str) -> list[dict[str, Any]]:
    """Rename the source's columns to ours and check them: the required ones present and non-empty in every row,
    every explicitly mapped one present in the split, text where text is expected. A split with a `text` column
    and no question column is a text split (documents, `data/text.py`): it needs `text` alone; one with a `choices`
column is a multiple-choice split (`_choice_records`)."""
    if not rows:
        return []
    available = sorted(rows[0])
    text_split = columns.get(TEXT_COLUMN, TEXT_COLUMN) in rows[0] and columns.get("question", "question") not in rows[0]
    choice_split = columns.get("choices", "choices") in rows[0]
    if choice_split:
        return _choice_records(rows, columns, split)
    required = (TEXT_COLUMN,) if text_split else REQUIRED_COLUMNS
    problems = []
    for ours in required:
        theirs = columns.get(ours, ours)
        if theirs not in rows[0]:
            problems.append(f"split {split!r} has no column {theirs!r} for {ours!r}; available: {available}; "
                            f"map it with data.columns.{ours}=<column> (or data.columns.text=<column> for a split "
                            "of documents)")
    for ours, theirs in columns.items():
        if ours not in required and theirs not in rows[0] and not (text_split and ours in REQUIRED_COLUMNS):
            problems.append(f"data.columns maps {ours} to {theirs!r}, which split {split!r} lacks (available: "
                            f"{available}); map it only for the splits that have it: "
                            f"data.columns.<split>.{ours}={theirs}")
    raise_if(problems)
    out = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {}
        for ours in ((TEXT_COLUMN, "entity") if text_split else (*QA_COLUMNS, "entity")):
            theirs = columns.get(ours, ours)
            value = row.get(theirs)
            if ours in required and _blank(value):
                problems.append(f"split {split!r} row {i + 1}: the {ours} ({theirs!r}) is empty or missing; fill or "
                                "remove the row")
            elif _blank(value):
                continue
            elif ours in LIST_COLUMNS:
                rec[ours] = _as_list(value)
            elif (text := _text(value)) is None:
                problems.append(f"split {split!r} row {i + 1}: the {ours} ({theirs!r}) is {type(value).__name__} "
                                f"{str(value)[:40]!r}, not text; write it as a string")
            else:
                rec[ours] = text
        out.append(rec)
        if len(problems) >= 10:
            problems.append("(further rows not checked)")
            break
    raise_if(problems)
    return out


def is_choice(rows: Any) -> bool:
    """Whether a split's records (or prepared rows) are multiple-choice questions (`_choice_records`)."""
    return bool(rows) and bool(rows[0].get("choices"))


def _choice_records(rows: list[dict[str, Any]], columns: dict[str, str], split: str) -> list[dict[str, Any]]:
    """A multiple-choice split (`choices` and `answer_index` columns, WMDP's and MMLU's `choices` / `answer`): each
    record its question, options and right option, with `answer` / `perturbed_answer` the right option and the
    others (what the QA probes score)."""
    names = {ours: columns.get(ours, ours) for ours in ("question", *CHOICE_COLUMNS, "entity")}
    missing = [f"{theirs!r} for {ours}" for ours, theirs in names.items() if ours != "entity" and theirs not in rows[0]]
    raise_if([f"split {split!r} has a choices column but no {', '.join(missing)}; available: {sorted(rows[0])}; "
              "map them with data.columns.<split>.<column>"] if missing else [])
    out, problems = [], []
    for i, row in enumerate(rows):
        question, options, index = (row.get(names[k]) for k in ("question", *CHOICE_COLUMNS))
        options = _as_list(options) if not _blank(options) else []
        number = int(index) if isinstance(index, int | float) or (isinstance(index, str) and index.isdigit()) \
            else None
        if _blank(question) or len(options) < 2 or number is None or not 0 <= number < len(options):
            problems.append(f"split {split!r} row {i + 1}: a multiple-choice row needs a question, at least two "
                            f"choices and the right one's index among them (got {len(options)} choices, index "
                            f"{index!r})")
            continue
        rec = {"question": str(question), "choices": options, "answer_index": number, "answer": options[number],
               "perturbed_answer": [o for j, o in enumerate(options) if j != number]}
        if not _blank(row.get(names["entity"])):
            rec["entity"] = str(row[names["entity"]])
        out.append(rec)
    raise_if(problems[:10])
    return out


def _file_problem(path: Path) -> str | None:
    """Why a data file cannot be read (checked before anything is loaded), or None."""
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(path).num_rows if path.stat().st_size > 0 else 0
        except (pa.ArrowException, OSError) as e:
            return (f"is not a Parquet file ({str(e).splitlines()[0]}); write it with pandas.DataFrame.to_parquet "
                    "or datasets' to_parquet, or give it the suffix of its format (.jsonl, .json, .csv)")
        return None if rows else "has no rows; fill it or point at another file"
    with path.open("rb") as f:
        lines = [line for _, line in zip(range(3), f, strict=False) if line.strip()]
    header = 1 if path.suffix.lower() == ".csv" else 0  # a CSV's first line is its header
    return None if len(lines) > header else "has no rows; fill it or point at another file"


def check_files(data: DataConfig) -> None:
    """Every file named in data.splits exists and has rows (checked before anything is loaded)."""
    problems = []
    for split, spec in data.splits.items():
        if not is_file_spec(spec):
            continue
        path = resolve_file(spec)
        if not path.is_file():
            problems.append(f"data.splits.{split}: file {spec!r} not found")
        elif problem := _file_problem(path):
            problems.append(f"data.splits.{split}: file {spec!r} {problem}")
    raise_if(problems)


def _pair(r: dict[str, Any]) -> tuple[str, str]:
    """A QA pair (or a document: "" and its text) compared case- and whitespace-insensitively."""
    answer = r["answer"] if "question" in r else r[TEXT_COLUMN]
    return (" ".join(r.get("question", "").lower().split()), " ".join(answer.lower().split()))


def warn_duplicates(splits: dict[str, list[dict[str, Any]]]) -> None:
    """A QA pair repeated within a split weighs twice in training and in every mean: say so (not an error: a
    benchmark may repeat a fact on purpose)."""
    for split, rows in splits.items():
        seen: dict[tuple[str, str], int] = {}
        repeats = []
        for i, r in enumerate(rows):
            if (k := _pair(r)) in seen:
                repeats.append((seen[k] + 1, i + 1))
            seen.setdefault(k, i)
        if repeats:
            first, again = repeats[0]
            what = "QA pair(s)" if rows and "question" in rows[0] else "document(s)"
            warn(f"split {split!r}: {len(repeats)} {what} repeat an earlier row (first: row {again} "
                 f"repeats row {first}); each copy counts in training and in the split's means; remove the copies "
                 "if unintended")


def check_overlap(splits: dict[str, list[dict[str, Any]]]) -> None:
    """Forget and retain must not share a QA pair, nor forget and holdout (it would leak membership)."""
    key = _pair

    forget = {key(r) for r in splits.get("forget", [])}
    problems = []
    for other in ("retain", "holdout"):
        shared = [k for k in (key(r) for r in splits.get(other, [])) if k in forget]
        if shared:
            what = "QA pairs" if shared[0][0] else "documents"
            problems.append(f"{len(shared)} {what} are in both forget and {other} (first: "
                            f"{(shared[0][0] or shared[0][1])[:60]!r}); "
                            f"remove them from one of the two splits")
    raise_if(problems)


def load_records(cfg: ExperimentConfig) -> dict[str, list[dict[str, Any]]]:
    """The splits of the configured source, normalised and checked (non-empty forget, no overlap)."""
    data = cfg.data
    check_files(data)
    splits = {}
    if data.source == "synthetic":
        splits = synthetic.generate(data.synthetic, data.forget_fraction, data.holdout_fraction, cfg.data_seed)
    for split, spec in data.splits.items():  # with source=synthetic: extra evaluation splits
        ds = _file_split(spec) if is_file_spec(spec) else _hf_split(data.path or "", spec, data.revision)
        splits[split] = normalize(ds.to_list(), data.columns_for(split), split)
    if not splits.get("forget"):
        raise UserError("the forget split is empty; point data.splits.forget at a non-empty split "
                        "or raise data.forget_fraction")
    if not splits.get("retain"):
        raise UserError("the retain split is empty; the oracle is trained on it, so it must have rows")
    check_overlap(splits)
    warn_duplicates(splits)
    return splits
