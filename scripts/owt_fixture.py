"""Fixture files for the OpenWebText / zero-shot demo, made from a local plain-text corpus.

    python scripts/owt_fixture.py ../shared/data/tinyshakespeare.txt runs/owt_fixture

Paragraphs (blank-line separated) become documents: the first 90% an "OpenWebText" ``owt.jsonl``;
the rest is written in the raw formats of the five zero-shot sets (LAMBADA jsonl, WikiText raw
lines with ``@-@`` and spaced punctuation, PTB lower-case lines with ``N`` and ``<unk>``, 1BW
word-tokenized sentences), so the detokenizers and loaders run on files shaped like the real ones.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def word_tokenize(text: str) -> str:
    """Space out punctuation and clitics the way the zero-shot corpora are published."""
    text = re.sub(r"([.,;:!?()\"])", r" \1 ", text)
    text = re.sub(r"(\w)('s|'d|'ll)\b", r"\1 \2", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def main(source: str, out: str) -> None:
    paragraphs = [p.strip() for p in Path(source).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    cut = int(0.9 * len(paragraphs))
    train, held = paragraphs[:cut], paragraphs[cut:]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "owt.jsonl", "w") as file:
        file.writelines(json.dumps({"text": p}) + "\n" for p in train)
    parts = [held[i::5] for i in range(5)]
    with open(folder / "lambada_test.jsonl", "w") as file:
        file.writelines(json.dumps({"text": p.replace("\n", " ")}) + "\n" for p in parts[0])
    for name, part in (("wiki2.train.raw", parts[1]), ("wiki103.test.raw", parts[2])):
        lines = [" = Act = \n", "\n"] + [" " + word_tokenize(p.replace("-", " - ")).replace(" - ", " @-@ ") + " \n"
                                         for p in part]
        (folder / name).write_text("".join(lines))
    sentences = [s for p in parts[3] for s in re.split(r"(?<=[.!?])\s+", p.replace("\n", " "))]
    ptb = [" ".join(re.sub(r"\d+", "N", re.sub(r"[^\w' ]", "", word_tokenize(s).lower())).split()) for s in sentences]
    (folder / "ptb.test.txt").write_text("".join(f" {s} \n" for s in ptb if s))
    sentences = [s for p in parts[4] for s in re.split(r"(?<=[.!?])\s+", p.replace("\n", " "))]
    (folder / "lm1b.test.txt").write_text("".join(word_tokenize(s) + "\n" for s in sentences))
    print(f"wrote {len(train)} documents and five zero-shot files to {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
