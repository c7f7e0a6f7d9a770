"""The README gives exactly two commands, and CI runs its test command word for word."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].startswith("./scripts/setup && ")
    assert commands[1].startswith("./scripts/setup && ")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_test_modules_have_unique_names():
    """tests/ has no __init__.py files, so pytest imports each test module by its
    basename: two files with one name in different directories stop collection
    ("import file mismatch") and with it the whole run."""
    root = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    for path in sorted(root.rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a module name"
        seen[path.name] = path
