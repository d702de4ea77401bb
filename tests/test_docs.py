"""The docs stay honest: links resolve, named scripts exist, shown flags are real.

- every relative link in README.md and docs/ (``[text](path)``, ``[text](path#anchor)``,
  ``[text](#anchor)``, images too) points at a file or folder of the repository, and every
  anchor at a heading of the target page (GitHub's heading ids);
- every script path the docs name (``benchmarks/...py``, ``examples/...sh``, ...) exists;
- every ``--kv-policy`` / ``--kara-*`` flag the README and docs show is one
  ``python -m sglang.launch_server --help`` lists (one call, about 20-40 s: marked ``sglang``);
- no section title names an issue number (the docs are organised by question).

Links inside fenced code blocks and inline code are not links and are skipped; links to the
web (``http(s)://``, ``mailto:``) are not fetched.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCRIPT = re.compile(r"(?<![\w./-])((?:benchmarks|examples|kara_sglang|kernels|patches|tests|\.ci)/[\w./-]*\w\.(?:py|sh))\b")
FLAG = re.compile(r"(?<![\w-])(--kv-policy|--kara-[a-z0-9]+(?:-[a-z0-9]+)*)")


def doc_files(root: Path = ROOT) -> List[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def prose_lines(text: str) -> Iterable[str]:
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's id for a heading: markdown links and code marks dropped, lower case,
    punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading id of a markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: Dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> Iterable[str]:
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            yield target


def link_problems(files: Iterable[Path], root: Path = ROOT) -> List[str]:
    """One line per link that does not resolve: a missing file or folder, or a missing anchor."""
    problems = []
    for path in files:
        for target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no such file or folder")
            elif root.resolve() not in dest.parents and dest != root.resolve():
                problems.append(f"{where}: points outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with id #{anchor} in {dest.name}")
    return problems


def named_scripts(files: Iterable[Path]) -> Dict[str, List[str]]:
    """Script paths the docs name (in prose, code spans and code blocks) -> the files naming them."""
    named: Dict[str, List[str]] = {}
    for path in files:
        for script in SCRIPT.findall(path.read_text(encoding="utf-8")):
            named.setdefault(script, []).append(path.name)
    return named


def shown_flags(files: Iterable[Path]) -> Dict[str, List[str]]:
    flags: Dict[str, List[str]] = {}
    for path in files:
        for flag in FLAG.findall(path.read_text(encoding="utf-8")):
            flags.setdefault(flag, []).append(path.name)
    return flags


# ------------------------------------------------------------------------------ the repository


def test_every_relative_link_and_anchor_resolves():
    problems = link_problems(doc_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_script_the_docs_name_exists():
    missing = {s: f for s, f in named_scripts(doc_files()).items() if not (ROOT / s).is_file()}
    assert not missing, f"scripts named in the docs but absent: {missing}"


def test_no_section_title_names_an_issue():
    titled = [f"{p.relative_to(ROOT)}: {line}" for p in doc_files()
              for line in prose_lines(p.read_text(encoding="utf-8"))
              if HEADING.match(line) and re.search(r"\bissues?\s*#?\d", line, re.IGNORECASE)]
    assert not titled, "section titles naming issues:\n" + "\n".join(titled)


@pytest.fixture(scope="module")
def launch_server_help() -> str:
    """``python -m sglang.launch_server --help`` once (the plugin adds its flags there)."""
    pytest.importorskip("sglang")
    from support import cli

    out = cli.run_all({"help": [sys.executable, "-m", "sglang.launch_server", "--help"]})["help"]
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.sglang
def test_every_flag_the_docs_show_is_a_launch_server_flag(launch_server_help):
    known = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", launch_server_help))
    assert "--kv-policy" in known and "--kara-window" in known, "the plugin's flags are not in --help"
    shown = shown_flags(doc_files())
    assert {"--kv-policy", "--kara-keep-ratio"} <= set(shown)  # the README's launch line is checked
    unknown = {flag: files for flag, files in shown.items() if flag not in known}
    assert not unknown, f"flags shown in the docs that launch_server --help does not list: {unknown}"


# ------------------------------------------------------------------------------ the checks


def test_the_link_check_catches_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Current results: one H200, fast\n\n## Notes\n\n## Notes\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok anchor](docs/page.md#current-results-one-h200-fast) "
        "[second notes](docs/page.md#notes-1) [here](#top) [web](https://example.com/x)\n\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#no-such) [bad local](#nowhere)\n\n"
        "`[not a link](nope.md)`\n\n```\n[also not](nope.md)\n```\n")
    problems = link_problems(doc_files(tmp_path), tmp_path)
    assert len(problems) == 3, problems
    assert any("(docs/missing.md): no such file" in p for p in problems)
    assert any("#no-such" in p for p in problems) and any("#nowhere" in p for p in problems)


def test_the_script_and_flag_scans():
    text = ("run `python benchmarks/gpu/headline.sh` then benchmarks/reasoning/paired.py --out x; "
            "srt/managers/scheduler.py is SGLang's; --kara-keep-ratio 0.25 --kv-policy kara --keep-ratio 1")
    path = ROOT / "README.md"
    assert SCRIPT.findall(text) == ["benchmarks/gpu/headline.sh", "benchmarks/reasoning/paired.py"]
    assert FLAG.findall(text) == ["--kara-keep-ratio", "--kv-policy"]
    assert slug("Is it the scorer? A teacher-forced probe, `fa3` (H200)") == "is-it-the-scorer-a-teacher-forced-probe-fa3-h200"
    assert slug("Teacher-forced fidelity of the model's own text") == "teacher-forced-fidelity-of-the-models-own-text"
    assert path.exists()
