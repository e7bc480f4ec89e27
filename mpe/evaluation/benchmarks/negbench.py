"""NegBench's multiple-choice CSV (``COCO_val_mcq_llama3.1_rephrased.csv`` …): columns ``image_path``,
``caption_0`` … ``caption_<N-1>``, ``correct_answer`` (the index of the right caption) and, optionally,
``correct_answer_template`` (the question type: affirmation, negation, hybrid), reported per type."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from mpe.config import NegBenchMcq
from mpe.errors import DataError
from mpe.evaluation.benchmarks.sets import ChoiceSet, ImageRef, require

LAYOUT = (
    "NegBench's MCQ CSV with the columns image_path (or filepath), caption_0 … caption_<N-1> and "
    "correct_answer (0 … N-1), optionally correct_answer_template"
)
IMAGE_COLUMNS = ("image_path", "filepath")  # NegBench writes image_path; its loaders also accept filepath


def read(cfg: NegBenchMcq) -> ChoiceSet:
    path = require(Path(cfg.path), LAYOUT)
    root = require(Path(cfg.image_root) if cfg.image_root else path.parent, LAYOUT, folder=True)
    out = ChoiceSet([], [], [], [])
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
        n = 0
        while f"caption_{n}" in columns:
            n += 1
        missing = (
            ([] if image_col else ["image_path"])
            + ([] if n >= 2 else [f"caption_{n}"])
            + ([] if "correct_answer" in columns else ["correct_answer"])
        )
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (columns: {columns}); expected {LAYOUT}")
        grouped = "correct_answer_template" in columns
        for i, row in enumerate(reader):
            where = f"{path}: row {i + 1} (line {reader.line_num})"
            choices = [row[f"caption_{j}"] for j in range(n)]
            empty = [f"caption_{j}" for j, c in enumerate(choices) if c is None or not c.strip()]
            if empty or not row[image_col]:
                raise DataError(f"{where}: empty {empty or [image_col]}")
            try:
                value = float(row["correct_answer"])  # pandas-written files may hold "2.0"
            except (TypeError, ValueError):
                value = 0.5
            if not value.is_integer():
                raise DataError(f"{where}: correct_answer {row['correct_answer']!r} is not an index")
            answer = int(value)
            if not 0 <= answer < n:
                raise DataError(f"{where}: correct_answer {answer} is not among caption_0 … caption_{n - 1}")
            file = root / row[image_col]  # an absolute image_path stays as it is
            ref = ImageRef(f"{where} ({file})", path=file)
            ref.check()
            out.images.append(ref)
            out.choices.append([c.strip() for c in choices])
            out.answers.append(answer)
            out.groups.append(metric_word(row["correct_answer_template"]) if grouped else None)
    if not out.images:
        raise DataError(f"{path}: no rows")
    return out


def metric_word(text: str | None) -> str | None:
    """A question type as a metric-key word (``accuracy_<word>``), or None when blank."""
    word = re.sub(r"[^A-Za-z0-9_-]+", "_", (text or "").strip()).strip("_")
    return word or None
