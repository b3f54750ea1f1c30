"""The deployment files parse and say what the docs promise (no cluster, no Docker needed)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_raycluster_has_head_cpu_and_gpu_groups():
    cluster = _load("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    assert "headGroupSpec" in spec
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}

    gpu = groups["gpu"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    for container in _containers(gpu["template"]):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(groups["cpu"]) + str(spec["headGroupSpec"])

    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    for pod in pods:
        for container in _containers(pod):
            assert container["image"] == "tokenmill:latest"
            assert {"secretRef": {"name": "tokenmill-s3"}} in container["envFrom"]  # shared only via S3
    for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in groups.values()]:
        assert all(isinstance(v, str) for v in params.values()), "KubeRay wants string rayStartParams"


def test_rayjob_runs_the_demo_on_the_same_cluster_spec():
    job = _load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"] == "python -m jobs.demo --run-dir s3://bucket/runs/demo"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]


def test_infra_names_only_entry_points_and_configs_that_exist():
    texts = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(INFRA.rglob("*")) if p.is_file()}
    modules = {m for text in texts.values() for m in re.findall(r"python -m (jobs\.\w+)", text)}
    assert {"jobs.run", "jobs.demo"} <= modules
    for module in modules:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"infra/ runs {module}, which does not exist"
    # lower case: NAME.yaml is a placeholder
    configs = {c for text in texts.values() for c in re.findall(r"jobs/configs/([a-z][\w.-]*\.yaml)", text)}
    assert "example.yaml" in configs
    for config in configs:
        assert (REPO / "jobs" / "configs" / config).is_file(), f"infra/ names jobs/configs/{config}, which does not exist"


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = _load("cluster-aws.yaml")
    assert set(config["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert "docker" in config and config["file_mounts"]
    validate_config(prepare_config(config))  # what `ray up` checks before it starts anything


def test_dockerfile_variants_and_copied_paths():
    text = (INFRA / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "FROM base-${VARIANT}" in text
    assert re.search(r'pip install "torch==2\.13\.0" --index-url', text)
    for stage in ("base-cpu", "base-cuda"):
        assert f"AS {stage}" in text
    copied = re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", text, flags=re.M)
    for sources in copied:
        for source in sources.split():
            assert (REPO / source).exists(), f"infra/Dockerfile copies {source}, which the repository lacks"


@pytest.mark.parametrize("script", ["start-local-cluster.sh", "stop-local-cluster.sh"])
def test_local_cluster_scripts_parse_and_have_help(script):
    subprocess.run(["bash", "-n", INFRA / script], check=True)
    out = subprocess.run(["bash", INFRA / script, "--help"], check=True, capture_output=True, text=True).stdout
    assert "--dir" in out
