"""The crate's layers, imports only downward (docs/guide/architecture.md).

Lists every `use crate::…` (and `crate::…` path) in src/ against the declared layer order and
reports an import of a higher layer. Names the crate root re-exports are resolved to the module
that defines them. `lib.rs` (the re-exports) is exempt, as are comments and unit-test modules.
Run by .ci/run.

    python3 scripts/check_layers.py           # exit 1 on a new upward import
    python3 scripts/check_layers.py --list    # also every import, with its layers
"""

import os
import pathlib
import re
import sys

# `LAYERS_SRC=DIR` checks another source tree.
ROOT = pathlib.Path(
    os.environ.get("LAYERS_SRC", pathlib.Path(__file__).resolve().parent.parent / "src")
).resolve()

# Top to bottom. A module may import its own layer or any below it.
LAYERS = [
    ("losses", ["loss", "sparse", "sparse_linear", "linear", "parallel", "hidden", "store",
                "testing", "onpolicy", "cross"]),
    ("backend", ["backend"]),
    ("kernel", ["kernel", "softmax"]),
    ("types", ["divergence", "reduction", "vocab", "validation", "error", "params", "tail",
               "rank"]),
]
# Upward imports that remain (none since the trait's composed defaults became tracked runs the
# losses implement). The check fails on any upward import, and on an entry here that is gone.
KNOWN: set = set()
RANK = {m: len(LAYERS) - i for i, (_, mods) in enumerate(LAYERS) for m in mods}
LAYER_NAME = {m: name for name, mods in LAYERS for m in mods}


def module_of(path):
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def root_exports():
    """`pub use module::{names}` of lib.rs: name -> module."""
    text = (ROOT / "lib.rs").read_text()
    out = {}
    for m in re.finditer(r"pub use (\w+)::(\{[^}]*\}|\w+);", text, re.S):
        module, names = m.group(1), m.group(2)
        for name in re.findall(r"\w+", names):
            out[name] = module
    return out


def code(text):
    """The file without comments (doc links are not imports) and without its unit tests."""
    text = re.split(r"#\[cfg\([^\]]*\btest\b[^\]]*\)\]\s*mod \w+", text)[0]
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def imports(text):
    """Every `crate::a::b` path in the code (use lines, brace groups and inline paths)."""
    text = code(text)
    found = []
    for m in re.finditer(r"use crate::(\{.*?\});", text, re.S):
        for item in re.findall(r"[\w:]+", m.group(1)):
            found.append(item)
    for m in re.finditer(r"\bcrate::(\w+)", text):
        found.append(m.group(1))
    return found


def main():
    exports = root_exports()
    upward, known = [], set()
    listing = "--list" in sys.argv
    for path in sorted(ROOT.rglob("*.rs")):
        if path.name == "lib.rs" and path.parent == ROOT:
            continue
        own = module_of(path)
        if own not in RANK:
            upward.append(f"{path.relative_to(ROOT.parent)}: module `{own}` has no layer")
            continue
        seen = set()
        for item in imports(path.read_text()):
            head = item.split("::")[0]
            target = exports.get(head, head)
            if target in ("self", "super") or target == own or target in seen:
                continue
            seen.add(target)
            if target not in RANK:
                continue  # a macro or a name that is not a module
            line = (f"{path.relative_to(ROOT.parent)} ({LAYER_NAME[own]}) -> {target} "
                    f"({LAYER_NAME[target]})")
            if listing:
                print(line)
            if RANK[target] > RANK[own]:
                key = (str(path.relative_to(ROOT)), target)
                if key in KNOWN:
                    known.add(key)
                else:
                    upward.append(line)
    gone = KNOWN - known
    for key in sorted(known):
        print(f"known upward import (to remove): src/{key[0]} -> {key[1]}")
    if gone:
        print("no longer upward, drop from KNOWN in scripts/check_layers.py:")
        print("\n".join(f"src/{a} -> {b}" for a, b in sorted(gone)))
    if upward:
        print(f"{len(upward)} new upward imports (a layer importing a higher one):")
        print("\n".join(upward))
    if upward or gone:
        sys.exit(1)
    print(f"layers: no new upward import ({len(known)} known ones left)")


if __name__ == "__main__":
    main()
