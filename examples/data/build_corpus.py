"""Rebuild the quickstart corpus (examples/data/quickstart_*.jsonl.zst) from two Debian packages.

English: the reStructuredText sources of the Python 3.11 documentation (package python3.11-doc, PSF licence),
one record per section. Chinese: classical poems and prose from the package fortunes-zh (public domain by
age) and the Chinese translation of the Debian Reference quoted in the same package (GPL-2.0+), one record
per entry. SOURCES.md beside this file lists what comes from where under which licence.

    mkdir -p /tmp/corpus && cd /tmp/corpus
    apt-get download fortunes-zh python3.11-doc
    for deb in *.deb; do dpkg -x "$deb" root; done
    python examples/data/build_corpus.py --package-root /tmp/corpus/root --output-dir examples/data

Records are shuffled with a fixed seed and dealt into --shards shards of {"text": ...} lines, compressed
with zstandard, so every shard mixes both languages and the output is identical on every run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re

import zstandard

FORTUNES = "usr/share/games/fortunes"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
PYTHON_DOC_PARTS = ("tutorial", "howto", "reference", "faq", "using", "extending")
# Entries of fortunes-zh's "chinese" file kept by attribution: ancient texts, and the Debian Reference.
CHINESE_SOURCES_KEPT = ("Osamu Aoki", "《论语》", "《道德经》", "《菜根谭》", "《增广贤文》")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
RST_UNDERLINE = re.compile(r"^([=\-~^*#\"'+])\1{3,}\s*$")


def fortune_entries(path: str) -> list[str]:
    """The entries of a fortune file (separated by lines holding only '%'), colour codes removed."""
    with open(path, encoding="utf-8") as source:
        text = ANSI_ESCAPE.sub("", source.read())
    return [entry.strip("\n") for entry in re.split(r"\n%\n", text) if entry.strip()]


def attribution(entry: str) -> str:
    last_line = entry.rstrip().split("\n")[-1].strip()
    return last_line[2:].strip() if last_line.startswith("--") else ""


def chinese_records(package_root: str) -> list[str]:
    fortunes = os.path.join(package_root, FORTUNES)
    records = fortune_entries(os.path.join(fortunes, "tang300")) + fortune_entries(os.path.join(fortunes, "song100"))
    for entry in fortune_entries(os.path.join(fortunes, "chinese")):
        if attribution(entry).startswith(CHINESE_SOURCES_KEPT):
            records.append(entry)
    return records


def rst_sections(text: str) -> list[str]:
    """Split a reStructuredText file before each titled section (a title line followed by an underline)."""
    lines = text.split("\n")
    starts = [0]
    for number in range(1, len(lines)):
        if RST_UNDERLINE.match(lines[number]) and lines[number - 1].strip() and not RST_UNDERLINE.match(lines[number - 1]):
            title_start = number - 1
            if title_start > 0 and RST_UNDERLINE.match(lines[title_start - 1]):
                title_start -= 1  # overlined title
            if title_start > starts[-1]:
                starts.append(title_start)
    starts.append(len(lines))
    sections = ["\n".join(lines[begin:end]).strip("\n") for begin, end in zip(starts, starts[1:])]
    return [section for section in sections if len(section) > 200]


def english_records(package_root: str) -> list[str]:
    root = os.path.join(package_root, PYTHON_DOC_SOURCES)
    records = []
    for part in PYTHON_DOC_PARTS:
        for folder, _, names in sorted(os.walk(os.path.join(root, part))):
            for name in sorted(names):
                if name.endswith(".rst.txt"):
                    with open(os.path.join(folder, name), encoding="utf-8") as source:
                        records.extend(rst_sections(source.read()))
    return records


def write_shards(records: list[str], output_dir: str, shards: int, seed: int) -> list[str]:
    random.Random(seed).shuffle(records)
    paths = []
    for shard in range(shards):
        path = os.path.join(output_dir, f"quickstart_{shard:02d}.jsonl.zst")
        lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in records[shard::shards])
        with open(path, "wb") as output:
            output.write(zstandard.ZstdCompressor(level=19).compress(lines.encode("utf-8")))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package-root", required=True, help="folder where fortunes-zh and python3.11-doc were unpacked")
    parser.add_argument("--output-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    chinese, english = chinese_records(args.package_root), english_records(args.package_root)
    paths = write_shards(chinese + english, args.output_dir, args.shards, args.seed)
    for path in paths:
        print(f"{path}: {os.path.getsize(path)} bytes")
    print(f"{len(chinese)} Chinese and {len(english)} English records")


if __name__ == "__main__":
    main()
