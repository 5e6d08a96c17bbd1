"""Fill the result blocks of RESULTS.md and README.md from committed outputs, so no number in them is typed by hand.

A block is the text between `<!-- BEGIN path -->` and `<!-- END path -->`; it is replaced by the
file at `path` (relative to the project root), or by only its Markdown table lines for `path#table`.
Run after a results script: python results/fill_readme.py
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- BEGIN (\S+) -->\n).*?(<!-- END \2 -->)", re.S)


def fill(text):
    """text with every block's body replaced by its file; a block naming a missing file is an error."""
    def body(match):
        name, _, part = match.group(2).partition("#")
        path = ROOT / name
        if not path.is_file():
            sys.exit(f"error: a block names {name}, which does not exist: run the results script that writes it")
        text = path.read_text()
        if part == "table":
            text = "".join(line for line in text.splitlines(keepends=True) if line.startswith("|"))
        return match.group(1) + text + match.group(3)
    return BLOCK.sub(body, text)


def main():
    for name in ("RESULTS.md", "README.md"):
        path = ROOT / name
        text = path.read_text()
        filled = fill(text)
        path.write_text(filled)
        print(f"{name}: {len(BLOCK.findall(text))} blocks filled, {'changed' if filled != text else 'unchanged'}")


if __name__ == "__main__":
    main()
