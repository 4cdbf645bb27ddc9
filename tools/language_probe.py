"""Make the multilingual model's script probe (llamaindex_kb/models/_static/e5_script_probe.npy).

e5 puts Chinese text and English text on two sides of one direction: the difference
of their centroids. The probe is that unit direction plus, last, the threshold halfway
between the two training groups' closest projections. Stores use it to keep one
centroid per script, and queries to pick their own (models/multilingual.py), so a base
mixing both languages scores off-topic questions as its halves would.

Training documents: 200 of cmrc2018 and 100 each of scifact and nfcorpus; held-out
documents (300 and 300 more) are printed to show the margin.

    PYTHONPATH=. python tools/language_probe.py --datasets ../shared/datasets [--write]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from llamaindex_kb.models import multilingual


def documents(root: Path) -> list[str]:
    with (root / "corpus.jsonl").open(encoding="utf-8") as lines:
        return [f"{d.get('title') or ''}\n{d.get('text') or ''}".strip()
                for d in map(json.loads, lines)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, required=True)
    parser.add_argument("--write", action="store_true", help="write the probe file")
    args = parser.parse_args(argv)
    rng = random.Random(11)
    chinese, scifact, nfcorpus = (documents(args.datasets / name) for name in
                                  ("cmrc2018_retrieval", "scifact", "nfcorpus"))
    for texts in (chinese, scifact, nfcorpus):
        rng.shuffle(texts)
    model = multilingual.LocalMultilingualEmbedding()

    def embed(texts: list[str]) -> np.ndarray:
        return np.asarray(model.get_text_embedding_batch(texts), np.float64)

    cjk, other = embed(chinese[:200]), embed(scifact[:100] + nfcorpus[:100])
    direction = cjk.mean(axis=0) - other.mean(axis=0)
    direction /= np.linalg.norm(direction)
    threshold = float((cjk @ direction).min() + (other @ direction).max()) / 2
    held_cjk, held_other = embed(chinese[200:500]), embed(scifact[100:250] + nfcorpus[100:250])
    print(f"threshold {threshold:.4f}; held out: Chinese projections from "
          f"{(held_cjk @ direction).min():.3f}, others up to {(held_other @ direction).max():.3f}; "
          f"misplaced {int((held_cjk @ direction <= threshold).sum())} of {len(held_cjk)} and "
          f"{int((held_other @ direction > threshold).sum())} of {len(held_other)}")
    if args.write:
        np.save(multilingual._PROBE_FILE, np.append(direction, threshold).astype(np.float32))
        print(f"wrote {multilingual._PROBE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
