"""The shell commands that README.md, deploy/README.md and docs/*.md show, read from the Markdown.

Every fenced ```bash / ```sh / ```console / ```shell block is split into commands (continuation
lines joined, a ``for ... done`` loop kept whole, comment lines dropped). A command that cannot run
on a CPU machine offline in a few minutes carries a marker a reader understands:

    some command --flag      # needs: gpu
    # needs: cluster          (on its own line: every command below it in the block)

The words are ``gpu``, ``cluster``, ``network`` and ``time`` (many minutes to hours). Every other
command is run as written by tests/test_doc_commands.py (README's vLLM block by
tests/vllm/test_readme_server.py): a block is claimed by exactly one runner in ``CLAIMS``, and an
unclaimed block with an unmarked command fails the suite, so a new command cannot go untested.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = {"bash", "sh", "console", "shell"}
NEEDS = {"gpu", "cluster", "network", "time"}
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"#\s*needs:\s*([\w ,-]+)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

# runner name -> (document, a regex that matches the one block it runs)
CLAIMS: dict[str, tuple[str, str]] = {
    "make": ("README.md", r"^make demo"),
    "caption": ("README.md", r"^\.venv/bin/mils caption /data/shards /data/captions --config run\.yaml --set"),
    "vllm-server": ("README.md", r"vllm\.entrypoints\.openai\.api_server"),
    "seed": ("README.md", r"^\.venv/bin/mils seed "),
    "report": ("README.md", r"^mils report "),
    "s3": ("README.md", r"^\.venv/bin/mils caption s3://"),
}


@dataclass(frozen=True)
class Command:
    text: str  # as written, continuation lines included
    line: int
    needs: frozenset[str]

    @property
    def argv(self) -> list[str]:
        """Words of the command without leading VAR=value assignments; ``<placeholders>`` become
        one word each."""
        flat = re.sub(r"<[^>]*>", "PLACEHOLDER", self.text.replace("\\\n", " "))
        words = shlex.split(flat, comments=True)
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        return words


@dataclass(frozen=True)
class Block:
    document: str  # path relative to the repository
    line: int
    language: str
    text: str
    commands: list[Command] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def unmarked(self) -> list[Command]:
        return [c for c in self.commands if not c.needs]

    def script(self, substitutions: dict[str, str]) -> str:
        """The block's unmarked commands as one bash script, each substitution applied; every
        substituted text must occur, so a changed README cannot make a substitution silently void."""
        text = "\n".join(c.text for c in self.unmarked)
        for old, new in substitutions.items():
            assert old in text, f"{self.where}: expected {old!r} in the commands:\n{text}"
            text = text.replace(old, new)
        return text


def documents() -> list[Path]:
    return [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _needs(text: str, where: str) -> frozenset[str]:
    found = _MARKER.search(text)
    if not found:
        return frozenset()
    words = frozenset(w.strip() for w in found.group(1).split(",") if w.strip())
    unknown = words - NEEDS
    assert not unknown, f"{where}: unknown needs marker {sorted(unknown)}; known: {sorted(NEEDS)}"
    return words


def split_commands(text: str, first_line: int, where: str) -> list[Command]:
    commands: list[Command] = []
    block_needs: frozenset[str] = frozenset()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            block_needs |= _needs(stripped, f"{where}+{i}")
            i += 1
            continue
        start = i
        if stripped.startswith("for "):
            while not lines[i].strip().startswith("done"):
                i += 1
        else:
            while lines[i].rstrip().endswith("\\"):
                i += 1
        chunk = "\n".join(lines[start : i + 1])
        needs = block_needs | _needs(chunk, f"{where}+{start}")
        commands.append(Command(chunk, first_line + 1 + start, needs))
        i += 1
    return commands


def shell_blocks() -> list[Block]:
    blocks = []
    for path in documents():
        content = path.read_text()
        for match in _FENCE.finditer(content):
            language = match.group(1)
            if language not in SHELL_LANGUAGES:
                continue
            line = content.count("\n", 0, match.start()) + 1
            document = str(path.relative_to(REPO))
            where = f"{document}:{line}"
            commands = split_commands(match.group(2), line, where)
            blocks.append(Block(document, line, language, match.group(2), commands))
    return blocks


def claimed_block(runner: str) -> Block:
    document, pattern = CLAIMS[runner]
    found = [
        b for b in shell_blocks() if b.document == document and any(re.search(pattern, c.text) for c in b.unmarked)
    ]
    assert len(found) == 1, f"runner {runner!r} should claim one block of {document}, found {[b.where for b in found]}"
    return found[0]


def run_script(script: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """A README block through bash, in a scratch directory whose ``.venv`` is this checkout's."""
    venv = cwd / ".venv"
    if not venv.exists():
        venv.symlink_to(Path(sys.executable).parent.parent)
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{script}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess, script: str) -> None:
    tail = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{script}\nexited {result.returncode}:\n{tail}"
