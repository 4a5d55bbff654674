"""The gateway image, checked without a container engine: the Dockerfile's shape (slim base,
non-root, no torch, the ports the manifests use), a build context that leaves out the venv,
caches, model files and keys, and that serving never imports torch."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HEAVY = ("torch", "torchvision", "open_clip", "onnxscript", "sklearn", "matplotlib")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_runtime_stage_is_slim_and_non_root():
    steps = dict((op, args) for op, args in final_stage() if op in ("FROM", "USER", "ENTRYPOINT"))
    assert re.search(r"PYTHON_IMAGE=python:3\.\d+-slim", DOCKERFILE)
    assert steps["FROM"] == "${PYTHON_IMAGE}"
    user = steps["USER"].split(":")[0]
    assert user.isdigit() and int(user) >= 1000, "numeric non-root uid (runAsNonRoot checks it)"
    assert steps["ENTRYPOINT"] == '["clipserve"]'
    k8s_uid = (ROOT / "k8s" / "base" / "gateway.yaml").read_text()
    assert f"runAsUser: {user}" in k8s_uid


def test_image_installs_the_serving_package_without_the_export_extra():
    installs = [args for op, args in instructions(DOCKERFILE)
                if op == "RUN" and "pip install" in args]
    assert any('install ".${EXTRAS:+[${EXTRAS}]}"' in args for args in installs), installs
    assert "export" not in re.findall(r"ARG EXTRAS=\"(.*?)\"", DOCKERFILE)[0]
    assert "! /opt/clipserve/bin/pip show torch" in DOCKERFILE  # the build fails if torch slips in
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(dependencies["dependencies"] + dependencies["optional-dependencies"]["triton"])
    for heavy in HEAVY:
        assert not re.search(rf"\b{heavy}\b", core), f"{heavy} in the serving install"


def test_exposed_ports_are_the_gateway_defaults_and_the_manifests_ports():
    exposed = {int(p) for op, args in final_stage() if op == "EXPOSE" for p in args.split()}
    manifest = (ROOT / "k8s" / "base" / "gateway.yaml").read_text()
    assert exposed == {int(p) for p in re.findall(r"containerPort: (\d+)", manifest)}


def test_build_context_leaves_out_the_venv_caches_models_and_secrets():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "allow-list: everything is excluded unless named"
    included = {line[1:] for line in ignore if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "clipserve", "server", "export",
                        "loadtest"}
    copied = {args.split()[0].rstrip("/") for op, args in instructions(DOCKERFILE)
              if op == "COPY" and not args.startswith("--from")}
    copied |= {"README.md"}  # `COPY pyproject.toml README.md ./`
    assert copied <= included | {"pyproject.toml"}, copied - included
    # pyproject's packages all come from folders the context includes.
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    assert set(package_dirs.values()) <= included


def test_serving_never_imports_torch():
    # What the image runs: the CLI, `serve`'s parser and the gateway's modules, in a fresh
    # interpreter. The dev venv has torch installed, so an import would show.
    code = textwrap.dedent("""
        import sys
        import clipserve.cli
        import clipserve.server.app, clipserve.server.security, clipserve.server.triton_client
        import clipserve.tokenizer
        try:
            clipserve.cli.main(["serve", "--help"])
        except SystemExit:
            pass
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
        print("HEAVY:" + ",".join(heavy))
    """ % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--tls-cert-file" in result.stdout and "--api-keys-file" in result.stdout
    assert result.stdout.rstrip().endswith("HEAVY:"), result.stdout[-500:]
