"""Keeps benchmarks/RESULTS.md as named sections, so each benchmark rewrites only its own."""
import pathlib
import re

HEADER = "# lgm-ext benchmark results\n\nEach section is written by the command it names.\n"


def replace_section(path: pathlib.Path, name: str, body: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- section:{name} -->", f"<!-- end:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
