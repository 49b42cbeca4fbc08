#!/usr/bin/env python3
"""Checks the relative links of README.md and docs/**/*.md: every `[text](path)`,
`![alt](path)` and `[label]: path` outside code must name a file or folder that exists, and
every `#anchor` (alone, or after a Markdown path) a heading of that file, by GitHub's slug rules.
Links to http(s), mailto and other schemes are not checked. Exits 1 listing each broken link.

    python3 scripts/check_links.py                       # from the crate root
    python3 scripts/check_links.py --root next           # another root
    python3 scripts/check_links.py --mount examples/data=../examples/data

`--mount PREFIX=DIR` (repeatable): a path under PREFIX that is missing from the root is looked
up under DIR instead (DIR relative to the current directory), for files that arrive later, e.g.
the bundled data, which moves under the root when the 0.2 crate becomes the repository root.
Standard library only.
"""

import argparse
import pathlib
import re
import sys
import unicodedata

FENCE = re.compile(r"^\s*(```+|~~~+)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target): text without brackets, or one level of nesting.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading):
    """GitHub's anchor of a heading: the rendered text, lower-cased, without punctuation
    other than `-` and `_`, spaces as `-`."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")
    out = []
    for ch in text.lower():
        if ch in " -_" or unicodedata.category(ch)[0] in "LNM":
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(path, cache={}):
    if path not in cache:
        seen, found = {}, set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")):
            found.add(m.group(1))
        cache[path] = found
    return cache[path]


def links(path):
    """(line number, target) of every relative link of a Markdown file."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1)
            continue
        line = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        for m in LINK.finditer(line):
            yield number, m.group(1)


OUTSIDE = object()


def resolve(root, mounts, source, target):
    """The file or folder a relative link names; None where it does not exist, OUTSIDE where
    it lies outside the root."""
    path = (source.parent / target).resolve() if target else source
    try:
        rel = path.relative_to(root)
    except ValueError:
        return OUTSIDE  # outside the repository: it will not be there on GitHub either
    if path.exists():
        return path
    for prefix, directory in mounts:
        try:
            rest = rel.relative_to(prefix)
        except ValueError:
            continue
        candidate = (directory / rest).resolve()
        if candidate.exists():
            return candidate
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_root = pathlib.Path(__file__).resolve().parent.parent
    parser.add_argument("--root", type=pathlib.Path, default=default_root,
                        help="the folder holding README.md and docs/ (default: the crate root)")
    parser.add_argument("--mount", action="append", default=[], metavar="PREFIX=DIR",
                        help="look up missing paths under PREFIX in DIR")
    args = parser.parse_args()
    root = args.root.resolve()
    mounts = []
    for spec in args.mount:
        prefix, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"--mount {spec}: expected PREFIX=DIR")
        mounts.append((pathlib.PurePosixPath(prefix.strip("/")), pathlib.Path(directory).resolve()))

    files = [root / "README.md"] if (root / "README.md").exists() else []
    files += sorted((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else []
    broken, checked = [], 0
    for source in files:
        for number, target in links(source):
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue
            checked += 1
            where = f"{source.relative_to(root)}:{number}: {target}"
            path_part, _, anchor = target.partition("#")
            found = resolve(root, mounts, source, path_part)
            if found is OUTSIDE:
                broken.append(f"{where} (outside the repository root {root})")
            elif found is None:
                broken.append(f"{where} (no such file or folder)")
            elif anchor and found.suffix == ".md" and found.is_file():
                if anchor not in anchors(found):
                    broken.append(f"{where} (no heading #{anchor} in {found.name})")
    if broken:
        print(f"{len(broken)} broken relative links (of {checked} in {len(files)} files):")
        print("\n".join(broken))
        sys.exit(1)
    print(f"links: {checked} relative links in {len(files)} files, all resolve")


if __name__ == "__main__":
    main()
