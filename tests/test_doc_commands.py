"""README.md, deploy/README.md and docs/*.md: their shell commands run as written.

The commands are read from the Markdown (tests/doc_commands.py). An unmarked command is run as
shown, in a scratch directory that holds a link to this checkout's ``.venv``; only paths, ports,
placeholder credentials and one size (the seed pool's, named below) are substituted, and every
substituted text must still be in the README. A command marked ``# needs: gpu|cluster|network|time``
is not run; the files of this repository it names must exist and, when it is one of this
project's programs (``mils``, ``benchmarks/*.py``, ``python -m mils_pipeline...``), its
arguments as written go through the program's real argument parser (the parser runs, then the
program stops before any work).

About 70 s on 2 cores, plus the seed pool of 6 texts with SmolLM2 (marked slow: one generate call
with all cores, about a minute on a quiet machine): the demo (45 s), two small caption runs (one on
S3, 10 s each) and 22 argument parses (10 s). README's vLLM block is run by
tests/vllm/test_readme_server.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.io.shards import write_shard
from tests.conftest import BUCKET, run_settings
from tests.doc_commands import CLAIMS, REPO, Command, claimed_block, ok, run_script, shell_blocks, split_commands

BLOCKS = shell_blocks()
MARKED = [pytest.param(c, id=f"{b.document}:{c.line}") for b in BLOCKS for c in b.commands if c.needs]
_REPO_PATH = re.compile(r"(?<![\w.-])((?:deploy|benchmarks|flows|mils_pipeline|tests|docs)/[\w./-]*\w)")

# The parser runs for real; parse_args then prints what it parsed and stops the program.
_DRY_PARSE = textwrap.dedent(
    """
    import argparse, json, runpy, sys
    _parse = argparse.ArgumentParser.parse_args
    def parse_only(self, args=None, namespace=None):
        print(json.dumps(vars(_parse(self, args, namespace)), default=str))
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = parse_only
    kind, target = sys.argv[1:3]
    sys.argv = [target, *sys.argv[3:]]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
    raise SystemExit("the program finished without parsing its arguments")
    """
)


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "MILS_HOME": str(tmp_path / "mils-home"),
    }


def tiny_run_yaml(path: Path, pool_dir: tuple[Path, str]) -> Path:
    """run.yaml of the README's commands, at test size: the tiny scorer, crossover only (no LLM)."""
    path.write_text(yaml.safe_dump(run_settings(pool_dir, operators=["crossover"], top_k=4)))
    return path


def our_program(command: Command) -> tuple[str, str, list[str]] | None:
    """(kind, target, args) when the command runs a program of this project, else None."""
    argv = [w for w in command.argv if w != "..."]
    if not argv:
        return None
    if Path(argv[0]).name == "mils":
        return "module", "mils_pipeline.cli", argv[1:]
    if Path(argv[0]).name.startswith("python") and len(argv) > 2:
        if argv[1] == "-m" and argv[2].startswith("mils_pipeline"):
            return "module", argv[2], argv[3:]
        if argv[1].startswith("benchmarks/") and argv[1].endswith(".py"):
            return "path", argv[1], argv[2:]
    return None


def test_the_documents_show_shell_blocks_and_markers():
    """The reader finds the blocks at all: a broken fence pattern would make every test below vacuous."""
    assert len(BLOCKS) >= 20 and len({b.document for b in BLOCKS}) >= 5
    marked = [p.values[0] for p in MARKED]
    assert {"gpu", "cluster", "network", "time"} <= {n for c in marked for n in c.needs}
    assert sum(our_program(c) is not None for c in marked) >= 15
    assert sum(len(b.unmarked) for b in BLOCKS) >= 8


def test_every_unmarked_command_is_run_by_a_test():
    claimed = {claimed_block(name).where: name for name in CLAIMS}
    unclaimed = [f"{b.where}: {c.text.splitlines()[0]}" for b in BLOCKS for c in b.unmarked if b.where not in claimed]
    assert not unclaimed, (
        "commands no test runs; run them in tests/test_doc_commands.py (a CLAIMS entry and a test) or mark "
        "them `# needs: gpu|cluster|network|time`:\n" + "\n".join(unclaimed)
    )


@pytest.mark.parametrize("command", MARKED)
def test_a_marked_command_names_files_that_exist_and_parses(command: Command):
    missing = [p for p in _REPO_PATH.findall(command.text) if not (REPO / p).exists()]
    assert not missing, f"line {command.line}: {missing} not in the repository:\n{command.text}"
    program = our_program(command)
    if program is None:
        return
    kind, target, args = program
    parsed = subprocess.run(
        [sys.executable, "-c", _DRY_PARSE, kind, target, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert parsed.returncode == 0, f"line {command.line}: {command.text}\n{parsed.stderr[-3000:]}"
    namespace = json.loads(parsed.stdout.strip().splitlines()[-1])
    if target == "benchmarks/quality.py":
        from benchmarks.quality import parse_configs
        from mils_pipeline.config import OptimizeConfig

        for operators, overrides in parse_configs(namespace["configs"]).values():
            OptimizeConfig(operators=operators, **overrides)


def test_make_demo_then_mils_report_as_written(tmp_path):
    """`make demo` is its recipe after `make install` (this suite runs in the installed env): the
    recipe `make -n` prints runs in a scratch directory; then README's `mils report` on its output.
    `make test` is this suite, so it is marked `needs: time` and `make -n` checks only its target."""
    make = claimed_block("make")
    # run as a reader runs them: not inside this suite's own `make test` (whose MAKEFLAGS/MAKELEVEL
    # would add "Entering directory" lines), and -B: the recipes as a fresh machine runs them, whether
    # or not this checkout's install is up to date (else "Nothing to be done for 'install'")
    outer = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    plain = {k: v for k, v in os.environ.items() if k not in outer}

    def dry_run(target: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-n", "-B", target], cwd=REPO, env=plain, capture_output=True, text=True, timeout=60
        )

    for command in make.commands:
        dry = dry_run(command.argv[1])
        assert dry.returncode == 0, dry.stderr
    install = dry_run("install")
    env = _env(tmp_path)
    for command in make.unmarked:
        assert command.argv[0] == "make" and len(command.argv) == 2, command.text
        recipe = dry_run(command.argv[1])
        assert recipe.stdout.startswith(install.stdout), recipe.stdout
        own = recipe.stdout[len(install.stdout) :]
        assert own.strip(), f"`make -n {command.argv[1]}` printed no recipe of its own"
        ok(run_script(own, tmp_path, env), own)
    assert (tmp_path / "mils-demo" / "captions" / "data").is_dir()

    report = claimed_block("report").script({})
    ok(run_script(report, tmp_path, env), report)
    assert "<img" in (tmp_path / "report" / "index.html").read_text()


def test_caption_command_as_written(tmp_path, photos, pool_dir):
    write_shard(str(tmp_path / "data" / "shards" / "a.tar"), [(n, {"jpg": photos[n]}) for n in ("astronaut", "coins")])
    tiny_run_yaml(tmp_path / "run.yaml", pool_dir)
    script = claimed_block("caption").script({"/data/": f"{tmp_path}/data/"})
    result = run_script(script, tmp_path, _env(tmp_path))
    ok(result, script)
    rows = pq.read_table(tmp_path / "data" / "captions" / "data").to_pylist()
    assert sorted(r["key"] for r in rows) == ["astronaut", "coins"]


@pytest.mark.slow
def test_seed_command_as_written_at_six_texts(tmp_path):
    """README's `mils seed`, with SmolLM2's GGUF for /models/x.gguf and 6 texts instead of 5,000
    (5,000 take about half an hour on 2 cores); then the files its comment promises. One generate
    call of 8 prompts with all cores: about a minute on a quiet machine, 9 minutes beside a training
    job (llama.cpp's threads spin-wait)."""
    from mils_pipeline.generate.llamacpp import default_model_path

    script = claimed_block("seed").script({"/models/x.gguf": str(default_model_path()), "--size 5000": "--size 6"})
    ok(run_script(script, tmp_path, _env(tmp_path)), script)
    texts = list((tmp_path / "pools").glob("*.txt"))
    assert len(texts) == 1 and texts[0].with_suffix(".json").is_file()
    assert len(texts[0].read_text().splitlines()) == 6


def test_s3_caption_command_as_written(tmp_path, photos, pool_dir, s3, s3_endpoint):
    """README's S3 block against the moto server: its endpoint for MinIO's, moto's test credentials
    for the `...` placeholders."""
    write_shard(str(tmp_path / "a.tar"), [(n, {"jpg": photos[n]}) for n in ("chelsea", "rocket")])
    s3.put(str(tmp_path / "a.tar"), f"{BUCKET}/shards/a.tar")
    if not s3.exists("captions"):
        s3.mkdir("captions")
    tiny_run_yaml(tmp_path / "run.yaml", pool_dir)
    script = claimed_block("s3").script(
        {
            "AWS_ACCESS_KEY_ID=...": f"AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}",
            "AWS_SECRET_ACCESS_KEY=...": f"AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}",
            "http://minio:9000": s3_endpoint,
        }
    )
    ok(run_script(script, tmp_path, _env(tmp_path)), script)
    parts = s3.glob("captions/v1/data/**/*.parquet") or s3.glob("captions/v1/data/*.parquet")
    assert parts, s3.find("captions")
    keys = sorted(k for p in parts for k in pq.read_table(s3.open(p, "rb")).column("key").to_pylist())
    assert keys == ["chelsea", "rocket"]


def test_blocks_parse_into_the_commands_a_reader_sees():
    text = "# needs: time\nexport A=1 \\\n  B=2\nfor g in 0 1; do\n  echo $g\ndone\nls docs/  # needs: gpu, network\n"
    commands = split_commands(text, 1, "x.md:1")
    assert [c.text.splitlines()[0] for c in commands] == [
        "export A=1 \\",
        "for g in 0 1; do",
        "ls docs/  # needs: gpu, network",
    ]
    assert [sorted(c.needs) for c in commands] == [["time"], ["time"], ["gpu", "network", "time"]]
