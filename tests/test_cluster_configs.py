"""The cluster definitions in study/cluster/ and the project image: the launcher YAMLs validate
against Ray's own cluster-config schema (with Ray's defaults filled in); the KubeRay manifest
against the RayCluster CRD's schema (vendored from KubeRay v1.7.0 in tests/data, unknown fields
refused as `kubectl apply`'s strict validation does); all three run the Dockerfile's image."""

from __future__ import annotations

import copy
import gzip
import json
import re

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
    assert any("pip install --no-deps -e ~/glioma-survival-study" in c for c in config["setup_commands"])
    assert config["docker"]["image"] == project_image(), "every node runs the project image"
    for node in nodes.values():
        assert isinstance(node["node_config"].get("scheduling", {}), dict), "GCP's API takes a mapping"


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_the_schema_check_is_real(name):
    config = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def project_image() -> str:
    """The tag the Dockerfile's header tells users to build (the definitions must use it)."""
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    return re.search(r"docker build -t (\S+) \.", text).group(1)


def test_dockerfile_runs_python_311_and_this_ray():
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu", base
    assert '.[cluster]' in text
    import tomllib

    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("ray[default]") for d in extras["cluster"]), "the jobs API needs ray[default]"
    assert any(d.startswith("boto3") for d in extras["cluster"]), "the AWS autoscaler on the head needs boto3"


def _strict(schema):
    """The CRD schema with unknown fields refused where Kubernetes would prune or reject them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def raycluster_schema() -> dict:
    with gzip.open(PROJECT_ROOT / "tests" / "data" / "kuberay_raycluster_v1.7.0_schema.json.gz") as source:
        return _strict(json.load(source)["schema"])


def test_kuberay_manifest_validates_against_the_crd_schema():
    cluster, _ = yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())
    schema = raycluster_schema()
    jsonschema.validate(cluster, schema)
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["rayStartParam"] = broken["spec"]["headGroupSpec"].pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


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


def test_kuberay_head_serves_mlflow_and_holds_the_object_store():
    cluster, _ = yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    head = pod["containers"][0]
    assert head["name"] == "ray-head"
    # KubeRay builds the head Service from the first container's ports: 5000 must be there.
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001, 5000}
    assert "/dev/shm" in {m["mountPath"] for m in head["volumeMounts"]}
    images = {c["image"] for c in pod["containers"]}
    images |= {c["image"] for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    assert images == {project_image()}


def test_tracking_server_refuses_a_port_in_use_and_an_unwritable_root(tmp_path, capsys):
    """`mlflow server` on a busy port logged the bind error and exited 0."""
    import socket

    from study.tracking.server import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--root", str(tmp_path / "srv")]) == 2
    assert f"--port {port} on 127.0.0.1 is not free" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["serve", "--port", str(port), "--root", str(blocker / "srv")]) == 2
    assert f"--root {blocker / 'srv'}: cannot be created" in capsys.readouterr().err
