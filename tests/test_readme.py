"""The README's snippets run exactly as written: the Python block against a real export, and every
`mcci` command line through the argument parser (the paths in them are examples, so only parsing is checked)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.cli import build_parser, main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_python_snippet_runs_as_written(trained, tmp_path):
    main(["export", "--checkpoint", str(trained / "mcci"), "--out", str(tmp_path / "exports" / "cifar10-clean")])
    (snippet,) = blocks("python")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1"}
    check = "\nassert model.num_classes == 3 and transform is not None\n"
    result = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_mcci_command_in_the_readme_parses():
    commands = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", re.sub(r"\[[^\]]*\]", "", line)).strip()  # [optional] parts, comments
            words = shlex.split(line)
            if "mcci" in words:
                commands.append(words[words.index("mcci") + 1:])
            elif words[:1] == [".venv/bin/mcci"] or ".venv/bin/mcci" in words:
                commands.append(words[words.index(".venv/bin/mcci") + 1:])
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # exits 2 on a command the README gets wrong
