"""Build a JSON-lines corpus of >= 100 MB of distinct real text from what a Debian machine already holds.

    python benchmarks/make_bench_corpus.py --output /tmp/bench/corpus.jsonl --target-mb 120

Sources, interleaved so that each has written about as many bytes as the others, until --target-mb of
text is written: manual pages in every installed language (/usr/share/man, roff markup reduced to its
text), package documentation (/usr/share/doc: READMEs, changelogs, copyright files), Markdown /
reStructuredText / text files, Python source files of the Python installations (/usr/lib/python3*, the
running interpreter's prefix and site-packages), and the quickstart corpus. Every file is one document {"text": ..., "source": path}; files that are not UTF-8,
shorter than 200 bytes or larger than 4 MB are left out, and identical contents are written once (no
repetition). The listing is sorted, so the same machine gives the same corpus.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import site
import sys
import sysconfig

MIN_BYTES, MAX_BYTES = 200, 4 << 20
ROFF_COMMENT = re.compile(r'^[.\']\\".*$', re.MULTILINE)
ROFF_REQUEST = re.compile(r"^[.'][A-Za-z]{1,3}\b ?", re.MULTILINE)
ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\[[A-Z]*\]|\\\([a-z]{2}|\\[&|^]")


def files_under(root: str, accept) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        found.extend(os.path.join(folder, name) for name in names if accept(name))
    return sorted(found)


def read_text(path: str) -> str | None:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as source:
            data = source.read(MAX_BYTES + 1)
        if not MIN_BYTES <= len(data) <= MAX_BYTES:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def roff_to_text(page: str) -> str:
    page = ROFF_COMMENT.sub("", page)
    page = ROFF_REQUEST.sub("", page)
    page = ROFF_ESCAPE.sub("", page).replace("\\-", "-").replace("\\e", "\\")
    return re.sub(r"\n{3,}", "\n\n", page).strip()


def python_roots() -> list[str]:
    roots = {sysconfig.get_paths()["stdlib"], *site.getsitepackages()}
    roots.update(os.path.join("/usr/lib", name) for name in os.listdir("/usr/lib") if name.startswith("python3"))
    return sorted(root for root in roots if os.path.isdir(root))


def manual_pages():
    for path in files_under("/usr/share/man", lambda name: name.endswith(".gz")):
        text = read_text(path)
        yield path, text and roff_to_text(text)


def package_documentation():
    is_doc = re.compile(r"(readme|changelog|news|copyright|changes|faq|authors|\.txt|\.md|\.rst)", re.IGNORECASE)
    for path in files_under("/usr/share/doc", lambda name: bool(is_doc.search(name))):
        yield path, read_text(path)


def python_files(suffixes: tuple[str, ...]):
    for root in python_roots():
        for path in files_under(root, lambda name: name.endswith(suffixes)):
            yield path, read_text(path)


def quickstart_corpus(quickstart_dir: str):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_llama.data.corpus import expand_inputs, iter_texts

    for number, text in enumerate(iter_texts(expand_inputs([quickstart_dir]), ["text"])):
        yield f"{quickstart_dir}#{number}", text


def interleaved(sources: dict, byte_counts: dict):
    """(source name, path, text) drawn next from the source with the fewest bytes written so far."""
    active = dict(sources)
    while active:
        name = min(active, key=lambda source: (byte_counts[source], source))
        try:
            path, text = next(active[name])
        except StopIteration:
            del active[name]
            continue
        yield name, path, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    parser.add_argument("--target-mb", type=float, default=120.0, help="stop after this many MB of text")
    parser.add_argument("--quickstart-dir", default=os.path.join(os.path.dirname(__file__), "..", "examples", "data"))
    args = parser.parse_args()

    target_bytes = int(args.target_mb * 1e6)
    sources = {
        "manual pages": manual_pages(),
        "package documentation": package_documentation(),
        "python documentation": python_files((".md", ".rst", ".txt")),
        "python source": python_files((".py",)),
        "quickstart corpus": quickstart_corpus(os.path.normpath(args.quickstart_dir)),
    }
    byte_counts, document_counts = dict.fromkeys(sources, 0), dict.fromkeys(sources, 0)
    seen = set()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".tmp", "w", encoding="utf-8") as output:
        for name, path, text in interleaved(sources, byte_counts):
            if sum(byte_counts.values()) >= target_bytes:
                break
            digest = text and hashlib.sha1(text.encode("utf-8")).digest()
            if not text or digest in seen:
                continue
            seen.add(digest)
            line = json.dumps({"text": text, "source": path}, ensure_ascii=False) + "\n"
            output.write(line)
            byte_counts[name] += len(line.encode("utf-8"))
            document_counts[name] += 1
    os.replace(args.output + ".tmp", args.output)
    written = sum(byte_counts.values())
    if written < target_bytes:
        print(f"warning: only {written / 1e6:.1f} MB of distinct text found, below --target-mb {args.target_mb}", file=sys.stderr)
    print(f"wrote {args.output}: {len(seen):,} documents, {written / 1e6:.1f} MB")
    for name in sources:
        print(f"  {name}: {document_counts[name]:,} documents, {byte_counts[name] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
