"""The Dockerfiles agree with what runs them: the operator's with the chart, the trainer's with
the Job the operator builds, and both build steps package exactly the product (never temper_dev).

The images are really built and run by ``make images`` and the e2e tests; this catches drift in
seconds: a named user breaks runAsNonRoot, a path the trainer writes is not a volume on a
read-only root, the baked model is hidden by a mount, ports drift from the probes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_chart_helm import CHART, ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q"]


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_runs_as_the_numeric_user_the_chart_expects() -> None:
    users = [arg for op, arg in final_stage() if op == "USER"]
    assert users, "the final stage must drop root"
    # The kubelet can only verify runAsNonRoot for a numeric UID.
    uid, _, gid = users[-1].partition(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) == values["securityContext"]["runAsUser"] != 0
    assert int(gid) == values["securityContext"]["runAsGroup"]


def test_exposes_the_chart_ports_and_runs_the_operator_module() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = {int(p) for op, arg in final_stage() if op == "EXPOSE" for p in arg.split()}
    assert exposed == {values["operator"]["healthPort"], values["operator"]["metricsPort"]}
    (entrypoint,) = [arg for op, arg in final_stage() if op == "ENTRYPOINT"]
    assert entrypoint == '["python", "-m", "temper"]'
    assert (ROOT / "operator" / "temper" / "__main__.py").is_file(), (
        "python -m temper needs temper/__main__.py"
    )


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_base_images_are_python_311_by_build_arg_only(dockerfile: Path) -> None:
    # The hermetic build (hack/build-images.sh) swaps the base through this ARG and nothing else.
    stages: set[str] = set()
    for op, arg in instructions(dockerfile):
        if op == "FROM":
            assert ":latest" not in arg
            assert arg.split()[0] in {"${PYTHON_IMAGE}", *stages}, arg
            stages.add(arg.split()[-1])
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile.read_text(), re.M)
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-\w+(@sha256:[0-9a-f]{64})?", default)


def build_context(dockerfile: Path, tmp_path: Path) -> Path:
    """Exactly what the Dockerfile's COPY lines bring in."""
    context = tmp_path / "context"
    for op, arg in instructions(dockerfile):
        if op != "COPY" or arg.startswith("--from"):
            continue
        *sources, _dest = arg.split()
        for source in sources:
            src = ROOT / source
            dest = context / source
            if src.is_dir():
                shutil.copytree(
                    src,
                    dest,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "Dockerfile"),
                    dirs_exist_ok=True,
                )
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest)
    return context


def build_wheel(source: Path, tmp_path: Path) -> set[str]:
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [*PIP_WHEEL, "-w", str(wheels), f"{source}/"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = wheels.glob("temper-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_copied_sources_build_the_operator_package(tmp_path: Path) -> None:
    # Rebuild what the Dockerfile's COPY lines bring in, offline, as its pip step would.
    names = build_wheel(build_context(DOCKERFILE, tmp_path), tmp_path)
    assert {"temper/__init__.py", "temper/api/contract.py"} <= names
    assert not [n for n in names if n.startswith(("temper_trainer/", "temper_dev/"))], (
        "trainer code leaked in"
    )


# --- the trainer image and the Job ---------------------------------------------------------------


def trainer_env() -> dict[str, str]:
    """The final stage's ENV, as NAME=value pairs (the form the Dockerfile uses)."""
    env: dict[str, str] = {}
    for op, arg in final_stage(TRAINER_DOCKERFILE):
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in arg.split())
    return env


def trainer_job(**config: Any) -> dict[str, Any]:
    from temper.api.run import PostTrainingRun
    from temper.builders import build_job, stage_contract
    from temper.config import OperatorConfig

    from tests.unit.test_planner import sample_run

    run = PostTrainingRun.model_validate(sample_run())
    cfg = OperatorConfig(trainer_image="trainer:test", **config)
    stage = run.spec.stages[0]
    contract = stage_contract(run, stage, cycle=1, attempt=1, config=cfg)
    return build_job(run, stage, contract, cycle=1, attempt=1, suspend=False, config=cfg)


def mounts_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume behind it."""
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0]["volumeMounts"]}


def under(path: str, mounts: dict[str, Any]) -> str | None:
    return next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)


def test_trainer_image_user_is_numeric_non_root_and_the_job_leaves_the_uid_to_it() -> None:
    (user,) = [arg for op, arg in final_stage(TRAINER_DOCKERFILE) if op == "USER"][-1:]
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "runAsNonRoot can only be checked for a numeric USER"
    assert int(uid) != 0
    assert gid in ("", "0"), "group 0, so an arbitrary UID (OpenShift) shares the image's group"
    job = trainer_job()
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    for sc in (pod["securityContext"], container["securityContext"]):
        assert "runAsUser" not in sc
        assert "runAsGroup" not in sc
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    configured = trainer_job(trainer_run_as_user=1000700000)["spec"]["template"]["spec"]
    assert configured["securityContext"]["runAsUser"] == 1000700000


def test_every_path_the_trainer_writes_is_a_job_volume() -> None:
    env = trainer_env()
    job = trainer_job()
    mounts = mounts_of(job)
    job_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    workdirs = [arg for op, arg in final_stage(TRAINER_DOCKERFILE) if op == "WORKDIR"]
    written = {
        "HOME": job_env["HOME"],
        "TEMPER_WORKDIR": env["TEMPER_WORKDIR"],
        "TEMPER_MODEL_CACHE": env["TEMPER_MODEL_CACHE"],
        "WORKDIR": workdirs[-1],
    }
    for what, path in written.items():
        assert under(path, mounts), f"{what}={path} is on the read-only root filesystem"
    # The Job names the same paths, so a custom trainer image gets them too.
    assert job_env["TEMPER_WORKDIR"] == env["TEMPER_WORKDIR"]
    assert job_env["TEMPER_MODEL_CACHE"] == env["TEMPER_MODEL_CACHE"]
    assert env["HOME"] == job_env["HOME"]


def test_tmp_and_shm_are_bounded_and_shm_is_memory() -> None:
    mounts = mounts_of(trainer_job())
    assert mounts["/tmp"]["emptyDir"]["sizeLimit"]
    shm = mounts["/dev/shm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert shm["sizeLimit"]
    sized = mounts_of(trainer_job(trainer_shm_size="8Gi", trainer_tmp_size="16Gi"))
    assert sized["/dev/shm"]["emptyDir"]["sizeLimit"] == "8Gi"
    assert sized["/tmp"]["emptyDir"]["sizeLimit"] == "16Gi"


def test_baked_tiny_model_is_world_readable_and_not_hidden_by_a_mount() -> None:
    baked = trainer_env()["TEMPER_BAKED_MODELS"]
    assert under(baked, mounts_of(trainer_job())) is None, f"a Job volume hides {baked}"
    runs = " ".join(arg for op, arg in instructions(TRAINER_DOCKERFILE) if op == "RUN")
    # Built in a cache mount keyed by its recipe, then copied to where the image reads it.
    assert re.search(rf'cp -a "\$built" {re.escape(baked)}/', runs), (
        "the model must land where the image reads it"
    )
    assert re.search(rf"chmod -R a\+rX\S* {re.escape(baked)}", runs), (
        "baked model must be readable by any UID"
    )
    copies = [arg for op, arg in final_stage(TRAINER_DOCKERFILE) if op == "COPY"]
    assert any(arg.split()[-1] == baked for arg in copies)
    assert not any("--chown" in arg for arg in copies), "no owner: the UID is the platform's to pick"


def test_trainer_image_entrypoint_and_metrics_port() -> None:
    (entrypoint,) = [arg for op, arg in final_stage(TRAINER_DOCKERFILE) if op == "ENTRYPOINT"]
    assert entrypoint == '["python", "-m", "temper_trainer"]'
    exposed = {int(p) for op, arg in final_stage(TRAINER_DOCKERFILE) if op == "EXPOSE" for p in arg.split()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert exposed == {values["trainer"]["metricsPort"]}
    container = trainer_job()["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "temper_trainer"]


def test_no_image_and_no_wheel_holds_the_test_harness(tmp_path: Path) -> None:
    for dockerfile in (DOCKERFILE, TRAINER_DOCKERFILE):
        for op, arg in instructions(dockerfile):
            if op in ("COPY", "ADD"):
                assert "hack" not in arg, f"{dockerfile}: {arg}"
                assert "tests" not in arg, f"{dockerfile}: {arg}"
        # The code is importable from /opt/temper-src, one folder per product package.
        stage = final_stage(dockerfile)
        env = " ".join(arg for op, arg in stage if op == "ENV")
        assert "PYTHONPATH=/opt/temper-src" in env
        for op, arg in stage:
            if op == "COPY" and not arg.startswith("--from"):
                source, dest = arg.split()
                assert source in ("operator/temper", "trainer_image/temper_trainer"), arg
                assert dest == f"/opt/temper-src/{Path(source).name}", arg
    ignore = (ROOT / ".containerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("*")] == "*", "the context is an allowlist"
    assert not any(line.startswith("!hack") or line.startswith("!tests") for line in ignore)
    assert (ROOT / ".dockerignore").read_text() == (ROOT / ".containerignore").read_text()
    names = build_wheel(build_context(TRAINER_DOCKERFILE, tmp_path / "trainer"), tmp_path / "trainer")
    assert {"temper_trainer/__main__.py", "temper/storage.py"} <= names
    assert not [n for n in names if n.startswith("temper_dev/")]
    # The repository's own wheel (what `pip install .` publishes) has no harness either.
    whole = build_wheel(ROOT, tmp_path / "repo")
    assert "temper_trainer/__main__.py" in whole
    assert not [n for n in whole if n.startswith("temper_dev/")], "pyproject's packages include temper_dev"
