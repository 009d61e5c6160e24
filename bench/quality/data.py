"""The corpus and its three splits, written as files into the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.quality.presets import Preset

#: bench/quality/data.py → the folder holding the checkout, whose shared/ has the corpus
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text() -> tuple[str, str]:
    """(text, source): tiny Shakespeare when ../shared has it, else CPython's docs text."""
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8"), str(CORPUS)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"


def _cut(text: str, pos: int) -> int:
    """The first paragraph boundary at or after `pos` (so no paragraph straddles two splits)."""
    j = text.find("\n\n", pos)
    return len(text) if j < 0 else j + 2


def write_splits(preset: Preset, run_dir: Path) -> dict[str, Any]:
    """train.txt / val.txt / test.txt in `run_dir` (kept if already there: resumable)."""
    names = ("train", "val", "test")
    paths = {n: run_dir / f"{n}.txt" for n in names}
    info_path = run_dir / "splits.json"
    if info_path.is_file() and all(p.is_file() for p in paths.values()):
        return json.loads(info_path.read_text())
    text, source = corpus_text()
    if preset.corpus_chars:
        text = text[: preset.corpus_chars]
    a = _cut(text, int(len(text) * preset.split[0]))
    b = _cut(text, int(len(text) * (preset.split[0] + preset.split[1])))
    parts = {"train": text[:a], "val": text[a:b], "test": text[b:]}
    for n in names:
        if len(parts[n].strip()) == 0:
            raise ValueError(f"the {n} split is empty; corpus too small for preset {preset.name}")
        paths[n].write_text(parts[n], encoding="utf-8")
    info = {
        "source": source,
        "chars": {n: len(parts[n]) for n in names},
        "fractions": [preset.split[0], preset.split[1], 1 - sum(preset.split)],
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info
