"""The codebase's shape, checked: one installed namespace, layering, no import cycles, module size,
and committed gRPC stubs that match the .proto."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> installed package (pyproject's package-dir)
PACKAGES = {
    "loraplex": "loraplex",
    "training": "loraplex.training",
    "serving": "loraplex.serving",
    "convert": "loraplex.convert",
}
# what serving and convert may import from training: the contracts that define an adapter
TRAINING_CONTRACTS = {
    "errors",
    "adapter_id",
    "manifest",
    "quant",
    "data",
    "evaluate",
    "lora_format",
    "architectures",
    "pretokenizers",
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """{installed module name: file} for every module of the project (generated stubs aside)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            relative = path.relative_to(REPO / folder).with_suffix("")
            if relative.parts[0] == "v1" or "base_model" in relative.parts:
                continue
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every loraplex module this file imports, at any depth (lazy imports count too)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("loraplex.")}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {n for n in imported_names(path, name) if n in mods and n != name} for name, path in mods.items()}


def test_every_import_uses_the_installed_namespace():
    """`from serving...` works only from a checkout; installed, only `loraplex.serving` exists."""
    bare = []
    for path in [
        *modules().values(),
        *REPO.glob("tests/*.py"),
        *REPO.glob("benchmarks/*.py"),
        *REPO.glob("deploy/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bare += [
                f"{path.relative_to(REPO)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in ("training", "serving", "convert")
            ]
    assert not bare, bare


def test_no_import_cycles():
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer", ["loraplex.serving", "loraplex.convert"])
def test_serving_and_convert_import_only_trainings_contracts(layer):
    wrong = {}
    for name, targets in import_graph().items():
        if name.startswith(layer + "."):
            bad = {
                t for t in targets if t.startswith("loraplex.training.") and t.split(".")[2] not in TRAINING_CONTRACTS
            }
            if bad:
                wrong[name] = sorted(bad)
    assert not wrong, f"{layer} reaches past training's contracts: {wrong}"


def test_long_modules_say_why_at_the_top():
    unexplained = []
    others = {str(p.relative_to(REPO)): p for p in [*REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]}
    for name, path in {**modules(), **others}.items():
        lines = path.read_text().splitlines()
        head = "\n".join(lines[:12]).lower()
        if len(lines) > MAX_LINES and f"over {MAX_LINES} lines" not in head:
            unexplained.append(f"{name} ({len(lines)} lines)")
    assert not unexplained, f"modules over {MAX_LINES} lines without a reason at the top: {unexplained}"


def test_engine_without_a_base_says_how_to_fix_it():
    from loraplex.serving.engine import EngineConfig, create_engine
    from loraplex.training.errors import ConfigError

    for engine in ("torch", "vllm"):
        if engine == "vllm":
            from loraplex.serving.engine.vllm_engine import vllm_unavailable_reason

            if vllm_unavailable_reason("bf16"):
                continue  # it refuses earlier, naming what is missing (test_vllm_mapping)
        with pytest.raises(ConfigError, match="base_model is required.*loraplex base"):
            create_engine(EngineConfig(engine=engine))


def test_committed_grpc_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from loraplex import protos

    for stub in protos.generate(tmp_path):
        committed = REPO / stub.relative_to(tmp_path)
        assert committed.read_bytes() == stub.read_bytes(), f"{committed} is stale: run python -m loraplex.protos"


def test_request_stream_result_works_inside_a_running_event_loop():
    """result() blocks on a thread-safe queue, so it works (and times out cleanly) in async code."""
    import asyncio

    from loraplex.serving.engine.api import RequestStream, StreamEvent

    async def inside_loop() -> tuple[str, str]:
        stream = RequestStream(engine=None, request_id="r1", adapter_id="")
        with pytest.raises(TimeoutError):
            stream.result(timeout=0.01)
        stream.push(StreamEvent(text="hel"))
        stream.push(StreamEvent(text="lo", final=True, finish_reason="stop"))
        text, final = stream.result(timeout=1)
        return text, final.finish_reason

    assert asyncio.run(inside_loop()) == ("hello", "stop")


def test_request_stream_async_iteration_wakes_on_pushes_from_another_thread():
    import asyncio
    import threading

    from loraplex.serving.engine.api import RequestStream, StreamEvent

    async def consume() -> list[str]:
        stream = RequestStream(engine=None, request_id="r2", adapter_id="")

        def produce():
            for i in range(50):
                stream.push(StreamEvent(text=str(i)))
            stream.push(StreamEvent(final=True, finish_reason="length"))

        threading.Thread(target=produce).start()
        return [event.text async for event in stream]

    texts = asyncio.run(asyncio.wait_for(consume(), 10))
    assert texts == [str(i) for i in range(50)] + [""]


@pytest.mark.slow
def test_the_wheel_installs_only_the_loraplex_namespace_and_its_commands_work(tmp_path):
    """A non-editable install: only loraplex/ and its dist-info, and the documented commands run."""
    import shutil

    source = tmp_path / "src"  # a copy: setuptools' build/ cache in the repo could carry stale modules
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "benchmarks"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("loraplex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "loraplex",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for needed in (
        "loraplex/v1/loraplex_pb2.py",
        "loraplex/training/base_model/model.safetensors",
        "loraplex/training/adapters/acme-fiscal/adapter_model.safetensors",
        "loraplex/training/data/acme-fiscal/eval.jsonl",
        "loraplex/serving/engine/api.py",
    ):
        assert needed in names, needed

    site = tmp_path / "site"  # the wheel alone; its dependencies come from this interpreter
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    outside = tmp_path / "elsewhere"  # never the repo: its folders must not be what gets imported
    outside.mkdir()

    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=outside, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        return done.stdout + done.stderr

    where = run(
        sys.executable,
        "-c",
        "import loraplex.serving.app, loraplex.convert.cli, loraplex.training.run;print(loraplex.serving.app.__file__)",
    )
    assert where.strip().startswith(str(site))
    assert run(sys.executable, "-m", "loraplex.cli", "base").strip().startswith(str(site))
    for argv in (
        ["loraplex", "--help"],
        ["loraplex", "train", "--help"],
        ["loraplex", "serve", "--help"],
        ["convert", "--help"],
        ["loraplex", "convert", "--help"],
    ):
        module = "loraplex.convert.cli" if argv[0] == "convert" else "loraplex.cli"
        run(sys.executable, "-m", module, *argv[1:])
    run(sys.executable, "-m", "loraplex.convert", "--help")
    run(sys.executable, str(site / "loraplex" / "training" / "run.py"), "--help")
    demo = run(sys.executable, "-m", "loraplex.cli", "demo", "--examples", "0")
    assert "exact match 100% with its adapter" in demo
