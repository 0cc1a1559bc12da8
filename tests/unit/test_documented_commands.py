"""Every `trtllm-pipeline` command shown to users (README, docs/, recipe comments, code comments and docstrings)
composes: a command that names a missing experiment, group option or key is a broken promise in the docs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import RECIPES_DIR
from tests.recipes_util import compose_recipe

REPO = Path(RECIPES_DIR).parent
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md")), *sorted(Path(RECIPES_DIR).glob("**/*.yaml")),
           *sorted((REPO / "pipeline").glob("**/*.py")), REPO / "scripts" / "setup.sh"]
# The command, up to the end of its code span, line or trailing `# comment`.
COMMAND = re.compile(r"(?:\.venv/bin/)?trtllm-pipeline\b([^`\n]*?)(?=`|\n|\s#|\s\s\s|$)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FLAGS_WITHOUT_VALUE = {"-m", "--multirun", "--help", "-h", "--hydra-help"}
FLAGS_WITH_VALUE = {"--cfg": {"job", "hydra", "all"}, "-c": {"job", "hydra", "all"}}


def shown_text(path: Path, line: str, in_fence: bool) -> list[str]:
    """The parts of a line that show commands: code spans and fenced code (Markdown), comment lines (YAML, shell),
    code spans (Python, whose other mentions of the name are code)."""
    spans = CODE_SPAN.findall(line)
    if path.suffix == ".md":
        return [line] if in_fence else spans
    if path.suffix in (".yaml", ".sh"):
        return [line] if line.lstrip().startswith("#") and not spans else spans
    return spans


def documented_commands() -> list[tuple[str, str]]:
    """(where, argument string) of every `trtllm-pipeline` command in the sources users read."""
    found = []
    for path in SOURCES:
        in_fence = False
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
            for text in shown_text(path, line, in_fence):
                for match in COMMAND.finditer(text):
                    found.append((f"{path.relative_to(REPO)}:{lineno}", match.group(1).strip()))
    return found


COMMANDS = documented_commands()


def overrides_of(args: str) -> list[str]:
    """The Hydra overrides of a command line, with `<placeholder>`s filled in; flags checked and dropped."""
    tokens = shlex.split(re.sub(r"<[^>]+>", "placeholder", args))
    overrides, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token in FLAGS_WITHOUT_VALUE or token == "placeholder":  # `<overrides>`: a schema
            i += 1
            continue
        if token in FLAGS_WITH_VALUE:
            assert i + 1 < len(tokens) and tokens[i + 1] in FLAGS_WITH_VALUE[token], f"{token} needs one of {FLAGS_WITH_VALUE[token]}"
            i += 2
            continue
        assert re.fullmatch(r"\+{0,2}[\w.\[\]/@-]+=.*|~[\w./@-]+(=.*)?", token) and not token.startswith("-"), \
            f"{token!r} is not a Hydra override (prose after a command? end it with a code span or '  #')"
        overrides.append(token)
        i += 1
    return overrides


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """A `-m` sweep as the recipes it launches: every value of each swept key, the other keys at their first value
    (each value composes; the full product would only repeat those checks)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed]
    keys = [o.get_key_element() for o in parsed]
    first = [f"{k}={c[0]}" if o.is_sweep_override() else c[0] for k, c, o in zip(keys, choices, parsed)]
    points = [first]
    for i, (key, values, o) in enumerate(zip(keys, choices, parsed)):
        if o.is_sweep_override():
            points += [first[:i] + [f"{key}={v}"] + first[i + 1:] for v in values[1:]]
    return points


def test_commands_are_found():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "recipes/pipeline.yaml", "recipes/model/hf_local.yaml"} <= where
    assert any(a.startswith("+experiment=") for _, a in COMMANDS)


def test_documented_commands_compose(tmp_path):
    """One Hydra context for all of them (composing is the slow part); a failure names every command it breaks."""
    from hydra import compose, initialize_config_dir

    from pipeline.cli import resolved_config

    points: dict[tuple[str, ...], list[str]] = {}
    failures = []
    for where, args in COMMANDS:
        first = args.split()[0] if args.split() else ""
        try:
            if re.fullmatch(r"[a-z][a-z_-]*", first):  # a subcommand (validate, ...): cli.main must dispatch it
                assert f'"{first}"' in (REPO / "pipeline" / "cli.py").read_text(), f"no subcommand {first!r}"
            elif re.search(r"(^|\s)(--config-dir|--config-name|-cd|-cn)(\s|=|$)", args):
                compose_user_recipe(where, args, tmp_path)
            else:
                for point in sweep_points(overrides_of(args)):
                    points.setdefault(tuple(point), []).append(where)
        except Exception as e:  # noqa: BLE001 - collected, reported together below
            failures.append(f"{where}: trtllm-pipeline {args}: {type(e).__name__}: {e}")
    with initialize_config_dir(RECIPES_DIR, version_base="1.3"):
        for point, wheres in points.items():
            try:
                resolved_config(compose("pipeline", overrides=list(point)))
            except Exception as e:  # noqa: BLE001
                failures.append(f"{', '.join(wheres)}: trtllm-pipeline {' '.join(point)}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0]}")
    assert not failures, "documented commands that do not compose:\n" + "\n".join(failures)


def test_a_broken_command_is_caught():
    with pytest.raises(Exception, match="smollm2_tp2"):
        compose_recipe(overrides_of("+experiment=smollm2_tp2"))
    with pytest.raises(AssertionError, match="not a Hydra override"):
        overrides_of("mapping=tp3 and then evaluate")


def compose_user_recipe(where: str, args: str, tmp_path: Path) -> None:
    """`--config-dir DIR --config-name NAME`: the recipe is the fenced block whose first line shows this command; it
    must compose over the shipped recipes, as the command line would."""
    from hydra import compose, initialize_config_dir

    from pipeline.cli import resolved_config

    tokens = [{"-cd": "--config-dir", "-cn": "--config-name"}.get(t, t) for t in shlex.split(args)]
    config_dir, name = tokens[tokens.index("--config-dir") + 1], tokens[tokens.index("--config-name") + 1]
    path, lineno = where.rsplit(":", 1)
    lines = (REPO / path).read_text().splitlines()[int(lineno) - 1:]
    block = "\n".join(lines[:next(i for i, line in enumerate(lines) if line.startswith("```"))])
    user_dir = tmp_path / config_dir
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / f"{name}.yaml").write_text(block)
    rest = [t for t in tokens if t not in ("--config-dir", config_dir, "--config-name", name)]
    with initialize_config_dir(str(user_dir), version_base="1.3"):
        resolved_config(compose(name, overrides=[f"hydra.searchpath=[file://{RECIPES_DIR}]", *rest]))
