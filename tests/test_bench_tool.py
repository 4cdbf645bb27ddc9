"""`python -m llamaindex_kb bench` from a checkout: it asks for its data sets rather than
guessing a path, and measures a BEIR-layout set through the real HTTP path without
printing a line per request."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

CORPUS = {
    "d1": ("Photosynthesis", "Chlorophyll in leaves turns sunlight into sugar."),
    "d2": ("Tides", "The moon's gravity pulls the oceans into tides."),
    "d3": ("Volcanoes", "Magma rises through the crust and erupts as lava."),
    "d4": ("Glaciers", "Compacted snow flows downhill as slow rivers of ice."),
}
QUERIES = {"q1": ("chlorophyll sunlight sugar", "d1"), "q2": ("magma lava crust", "d3")}


def beir_set(root: Path) -> Path:
    """A four-document data set in the BEIR layout the benchmark reads."""
    (root / "tiny" / "qrels").mkdir(parents=True)
    (root / "tiny" / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": doc, "title": title, "text": text}) + "\n"
        for doc, (title, text) in CORPUS.items()))
    (root / "tiny" / "queries.jsonl").write_text("".join(
        json.dumps({"_id": qid, "text": text}) + "\n" for qid, (text, _) in QUERIES.items()))
    (root / "tiny" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{qid}\t{doc}\t1\n" for qid, (_, doc) in QUERIES.items()))
    return root


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamaindex_kb", "bench", *args], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_bench_without_data_sets_says_how_to_name_them() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "LLAMAINDEX_KB_DATASETS"}
    result = bench("--skip-scale", env=environ)
    assert result.returncode == 2
    assert ("--datasets DIR is required (or set LLAMAINDEX_KB_DATASETS)" in result.stderr)


def test_bench_measures_a_data_set_named_by_the_environment_quietly(tmp_path: Path) -> None:
    environ = {**os.environ, "LLAMAINDEX_KB_DATASETS": str(beir_set(tmp_path / "sets"))}
    result = bench("--sets", "tiny", "--modes", "keyword", "--skip-scale", "--skip-ingestion",
                   "--skip-llamaindex", "--skip-multilingual-speed", "--skip-changes",
                   "--skip-access", "--work-dir", str(tmp_path / "work"), env=environ)
    assert result.returncode == 0, result.stderr
    assert "tiny: 4 documents, 2 test queries" in result.stdout
    # Each query's words are in its one relevant document only: ranked first, nDCG@10 1.
    assert re.search(r"^\s+keyword\s+nDCG@10 1\.0000  Recall@100 1\.0000", result.stdout,
                     re.MULTILINE), result.stdout
    assert "/retrieval" not in result.stderr  # no access log line per request
