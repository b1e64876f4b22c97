"""The cluster definitions in study/cluster/: the launcher YAMLs validate against Ray's own
cluster-config schema (with Ray's defaults filled in); the KubeRay manifest is checked by hand
(no CRD schema ships with Ray)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import PROJECT_ROOT

CLUSTER = PROJECT_ROOT / "study" / "cluster"


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_launcher_config_validates_against_rays_schema(name):
    config = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}, "trials never run on the head"
    gpus = sorted(n["resources"].get("GPU", 0) for n in nodes.values())
    assert gpus[-1] == 8 and 1 in gpus, "an 8-GPU and a 1-GPU worker type"
    assert all(n.get("min_workers", 0) == 0 for n in nodes.values()), "GPU nodes only when needed"
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start
    assert "study.tracking serve" in start and "--host" not in start.split("study.tracking serve")[1]
    assert any("pip install -e ~/glioma-survival-study" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_the_schema_check_is_real(name):
    config = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_kuberay_manifest():
    cluster, claim = yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(isinstance(v, str) for g in [head, *spec["workerGroupSpecs"]] for v in g["rayStartParams"].values()), \
        "KubeRay wants rayStartParams as strings"
    mlflow = [c for c in head["template"]["spec"]["containers"] if c["name"] == "mlflow"][0]
    assert mlflow["command"][:4] == ["python", "-m", "study.tracking", "serve"] and "--host" not in mlflow["command"]
    volumes = {v["name"] for v in head["template"]["spec"]["volumes"]}
    assert {m["name"] for m in mlflow["volumeMounts"]} <= volumes
    assert claim["kind"] == "PersistentVolumeClaim"
    assert head["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    gpus = []
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, "guaranteed QoS: GPU pods are not evicted for memory"
        gpus.append(int(limits["nvidia.com/gpu"]))
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts, "the object store needs shared memory"
    assert sorted(gpus) == [1, 8]
