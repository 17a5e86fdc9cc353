"""mkdocs hooks (mkdocs.yml): pages generated at build time, so they cannot drift from the code.

- ``cli-reference.md``: every ``lgm`` command's ``--help``, rendered from the Typer app (``lgm_cli.app``) at
  80 columns, as a terminal shows it;
- ``benchmark-results.md``: ``benchmarks/RESULTS.md``, which lives beside the benchmarks that write it;

and ``404.html`` with links relative to the site's root (mkdocs writes them root-absolute, ``/assets/...``, which
break when the site is opened from disk or served under a sub-path).

Both are built from this checkout (its root goes first on ``sys.path``); nothing is fetched.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def _commands(group, path=()):
    """(path, command) for every command of the click group, depth first, in registration order."""
    for name, cmd in group.commands.items():
        if getattr(cmd, "commands", None):
            yield (*path, name), cmd
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def cli_reference() -> str:
    """The CLI reference page: ``lgm --help`` and each command's ``--help``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from typer.main import get_command
    from typer.testing import CliRunner

    from lgm_cli.app import app

    def help_of(args):
        r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}, color=False)
        if r.exit_code != 0:
            raise RuntimeError(f"lgm {' '.join(args)} --help failed:\n{r.output}")
        return r.output.rstrip()

    out = ["# CLI reference", "",
           "Every `lgm` command's `--help`, generated from the command itself when the site is built (`make docs`).",
           "What the options mean across commands, and a walk-through, are in "
           "[The lab and the `lgm` command](lab.md).", "",
           "## lgm", "", "```text", help_of([]), "```", ""]
    for path, _ in _commands(get_command(app)):
        out += [f"## lgm {' '.join(path)}", "", "```text", help_of(list(path)), "```", ""]
    return "\n".join(out)


def on_files(files, config):
    files.append(File.generated(config, "cli-reference.md", content=cli_reference()))
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    files.append(File.generated(config, "benchmark-results.md", content=results))
    return files


def relative_404(html: str) -> str:
    """404.html (at the site's root) with its root-absolute links (``href="/x"``, ``src="/x"``, the theme's
    ``"base": "/"``) made relative to that root."""
    html = re.sub(r'\b(href|src|action)="/(?!/)', r'\1="./', html)
    return html.replace('"base": "/"', '"base": "."')


def on_post_build(config):
    page = Path(config["site_dir"]) / "404.html"
    if page.exists():
        page.write_text(relative_404(page.read_text()))
