"""The cluster definitions in study/cluster/ and the project image: the launcher YAMLs validate
against Ray's own cluster-config schema (with Ray's defaults filled in); the KubeRay manifest
against the RayCluster CRD's schema (vendored from KubeRay v1.7.0 in tests/data, unknown fields
refused as `kubectl apply`'s strict validation does); all three run the Dockerfile's image, built
from the versions pinned in study/cluster/image-constraints.txt. What a first cloud run needs is
checked statically here (the clouds themselves are never reached): every AWS node's instance
profile and a pinned AMI, the GCP GPU nodes' driver and the wait for it, the tracking server's
values read from study/cluster/tracking.env, KubeRay's pod identity, pull secret and volume
permissions, and that docs/cluster-steps.md's commands parse."""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import PROJECT_ROOT

CLUSTER = PROJECT_ROOT / "study" / "cluster"
TRACKING_ENV = CLUSTER / "tracking.env"
STEPS = PROJECT_ROOT / "docs" / "guides" / "cluster.md"
PROFILE_ARN = "arn:aws:iam::ACCOUNT_ID:instance-profile/glioma-study"
AMI_SSM_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


def kuberay_documents() -> dict[str, dict]:
    """kuberay.yaml's documents by kind (one of each)."""
    documents = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    kinds = [d["kind"] for d in documents]
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayCluster", "ServiceAccount"], kinds
    return {d["kind"]: d for d in documents}


def kuberay_pods(cluster: dict) -> list[dict]:
    """The pod specs of the head and of every worker group."""
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


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
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in config["setup_commands"]), \
        "shells on the nodes (ray attach, ray exec) use the token too"
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
    cluster = kuberay_documents()["RayCluster"]
    schema = raycluster_schema()
    jsonschema.validate(cluster, schema)
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["rayStartParam"] = broken["spec"]["headGroupSpec"].pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_kuberay_manifest():
    documents = kuberay_documents()
    cluster, claim = documents["RayCluster"], documents["PersistentVolumeClaim"]
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
    cluster = kuberay_documents()["RayCluster"]
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


# --- What a first cloud run needs (issue 27): checked here, never against a cloud -----------------


def test_launcher_commands_are_valid_shell():
    """Every command the launchers run (on the host or in the container) parses in bash: a quoting
    slip would only show on a cloud node, minutes into `ray up`."""
    for name in ("aws", "gcp"):
        config = launcher(name)
        commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                  "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                    for c in config[key]]
        commands += [c for node in config["available_node_types"].values()
                     for key in ("initialization_commands", "worker_setup_commands") for c in node.get(key, [])]
        for command in commands:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{name}.yaml: {command}\n{result.stderr}"


def test_every_aws_node_gets_the_instance_profile_and_a_pinned_ami():
    config = launcher("aws")
    text = (CLUSTER / "aws.yaml").read_text()
    assert "latest_dlami" not in text, "latest_dlami resolves to an Ubuntu 18.04 image with CUDA 11.2"
    images = set()
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        assert node_config.get("IamInstanceProfile") == {"Arn": PROFILE_ARN}, f"{name}: S3 access needs the profile"
        images.add(node_config["ImageId"])
    assert len(images) == 1, f"one image on every node, got {images}"
    (image,) = images
    assert re.fullmatch(r"ami-[0-9a-f]{17}", image) or image == "ami-REPLACE-WITH-SSM-VALUE", image
    # The comment names the image, its date and region, and how to look up another region's id.
    assert re.search(r"Deep Learning Base OSS Nvidia Driver GPU AMI \(Ubuntu 22\.04\) \d{8}, "
                     + re.escape(config["provider"]["region"]), text)
    assert AMI_SSM_PARAMETER in text and "aws ssm get-parameter" in text


def test_gcp_gpu_nodes_install_the_driver_and_wait_for_it():
    config = launcher("gcp")
    nodes = config["available_node_types"]
    gpu_types = [name for name, node in nodes.items() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types, "GPU worker types"
    for name, node in nodes.items():
        node_config = node["node_config"]
        items = {i["key"]: i["value"] for i in node_config.get("metadata", {}).get("items", [])}
        # Ray runs a node type's own initialization_commands instead of the global ones, outside
        # the container and before Docker starts (Ray only hands a container the GPUs that
        # nvidia-smi shows at that moment).
        init = " ".join(node.get("initialization_commands", config["initialization_commands"]))
        image = node_config["disks"][0]["initializeParams"]["sourceImage"]
        family = re.fullmatch(r"projects/deeplearning-platform-release/global/images/family/"
                              r"common-cu12\d-ubuntu-2204-nvidia-(\d+)", image)
        assert family and int(family.group(1)) >= 580, f"{name}: {image} (torch's CUDA 13 build needs 580+)"
        if name in gpu_types:
            assert items.get("install-nvidia-driver") == "True", name
            assert "until nvidia-smi" in init and "timeout 600" in init, name
            assert "lspci" in init, f"{name}: the wait runs only where a GPU exists"
        else:
            assert "install-nvidia-driver" not in items and "nvidia-smi" not in init, name


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_launcher_head_starts_the_tracking_server_from_tracking_env(name):
    config = launcher(name)
    (serve,) = [c for c in config["head_start_ray_commands"] if "study.tracking serve" in c]
    path = "~/glioma-survival-study/study/cluster/tracking.env"
    assert re.search(r"set -a && \. " + re.escape(path) + r" && set \+a", serve), serve
    assert serve.index(path) < serve.index("study.tracking serve"), "exported before the server starts"
    assert "--root ~/mlflow-server --port 5000" in serve and "--host" not in serve
    # The file reaches the head with the checkout (file_mounts, filtered by .gitignore).
    assert config["file_mounts"]["~/glioma-survival-study"] == "."
    assert TRACKING_ENV.exists()
    if shutil.which("git") and (PROJECT_ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(TRACKING_ENV)], cwd=PROJECT_ROOT).returncode
        assert ignored == 1, "rsync_filter [.gitignore] would leave tracking.env behind"


def test_tracking_env_holds_the_two_values_in_a_form_bash_and_kubectl_read():
    lines = [line for line in TRACKING_ENV.read_text().splitlines() if line.strip() and not line.startswith("#")]
    values = dict(line.split("=", 1) for line in lines)
    assert list(values) == ["MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"]
    assert values["MLFLOW_BACKEND_STORE_URI"] == "postgresql://USER:PASSWORD@HOST:5432/mlflow"
    assert values["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://BUCKET/mlflow-artifacts"
    for line in lines:  # kubectl --from-env-file keeps quotes and spaces; `.` in bash would not
        assert re.fullmatch(r"[A-Z_]+=[^\s'\"]+", line), line
    text = TRACKING_ENV.read_text()
    assert "gs://BUCKET/mlflow-artifacts" in text and "sqlite:////home/ray/mlflow-server/mlflow.db" in text
    assert "kubectl create secret generic glioma-study-tracking --from-env-file=study/cluster/tracking.env" in text
    exported = subprocess.run(["bash", "-c", f"set -a; . {shlex.quote(str(TRACKING_ENV))}; set +a; env"],
                              capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, check=True).stdout
    assert {k: v for k, v in (line.split("=", 1) for line in exported.splitlines() if "=" in line)
            if k.startswith("MLFLOW_")} == values
    dockerignore = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    assert "study/cluster/tracking.env" in dockerignore, "the database password stays out of the image"


def _stub_tracking_server(tmp_path, port: int):
    """A `python` on PATH that, for `python -m study.tracking serve`, logs the MLflow variables it was
    given and answers /health on `port` (or exits 2 as the real one does for a database it cannot
    reach, when FAIL is set); anything else runs the real interpreter."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    server = ("import http.server as h\n"
              "class H(h.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(b'OK')\n"
              "    def log_message(self, *args): pass\n"
              f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    stub.write_text(f"""#!/bin/bash
if [ "$1 $2 $3" = "-m study.tracking serve" ]; then
  echo "backend=$MLFLOW_BACKEND_STORE_URI artifacts=$MLFLOW_ARTIFACTS_DESTINATION args=$*"
  if [ -n "$FAIL" ]; then echo "error: --backend-store-uri HOST:5432/mlflow: cannot connect"; exit 2; fi
  exec {shlex.quote(sys.executable)} -c {shlex.quote(server)}
fi
exec {shlex.quote(sys.executable)} "$@"
""")
    stub.chmod(0o755)
    return stub.parent


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_head_start_commands_serve_tracking_env_and_fail_loudly(name, tmp_path):
    """The head's tracking commands, run by bash as the launcher runs them (with a stand-in server on
    a free port): the server gets tracking.env's values; a second `ray up` leaves a running server
    alone; and a server that exits (a database it cannot reach) fails the start with its reason
    instead of leaving a cluster without tracking."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tmp_path / "home"
    (home / "glioma-survival-study" / "study" / "cluster").mkdir(parents=True)
    shutil.copy(TRACKING_ENV, home / "glioma-survival-study" / "study" / "cluster" / "tracking.env")
    commands = [c for c in launcher(name)["head_start_ray_commands"] if "ray st" not in c]
    assert len(commands) == 2, "start the server, then wait for it"
    start, wait = (c.replace("5000", str(port)) for c in commands)
    env = {**os.environ, "HOME": str(home), "PATH": f"{_stub_tracking_server(tmp_path, port)}:{os.environ['PATH']}"}
    pid_file, log = home / "mlflow-server.pid", home / "mlflow-server.log"
    try:
        env["FAIL"] = "1"
        assert subprocess.run(["bash", "-c", start], env=env, timeout=60).returncode == 0
        t0 = time.monotonic()
        failed = subprocess.run(["bash", "-c", wait], env=env, capture_output=True, text=True, timeout=120)
        assert failed.returncode == 1 and time.monotonic() - t0 < 30, "a dead server fails the start at once"
        assert "cannot connect" in failed.stdout and "tracking.env" in failed.stdout, failed.stdout

        env["FAIL"] = ""
        assert subprocess.run(["bash", "-c", start], env=env, timeout=60).returncode == 0
        assert subprocess.run(["bash", "-c", wait], env=env, timeout=120).returncode == 0
        assert ("backend=postgresql://USER:PASSWORD@HOST:5432/mlflow artifacts=s3://BUCKET/mlflow-artifacts "
                f"args=-m study.tracking serve --root {home}/mlflow-server --port {port}") in log.read_text()
        first = pid_file.read_text()
        assert subprocess.run(["bash", "-c", start], env=env, timeout=60).returncode == 0
        assert pid_file.read_text() == first, "a server that answers is not started twice"
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


def test_kuberay_pods_identity_pull_secret_and_volume_permissions():
    documents = kuberay_documents()
    cluster, account = documents["RayCluster"], documents["ServiceAccount"]
    assert account["apiVersion"] == "v1" and account["metadata"]["name"] == "glioma-study"
    for pod in kuberay_pods(cluster):
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["imagePullSecrets"] == [{"name": "glioma-study-registry"}]
        # Ray's images run as uid 1000, gid 100: mounted volumes must be writable by gid 100.
        assert pod["securityContext"]["fsGroup"] == 100
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mlflow = [c for c in head["containers"] if c["name"] == "mlflow"][0]
    assert mlflow["envFrom"] == [{"secretRef": {"name": "glioma-study-tracking"}}], "the one place on Kubernetes"
    root = mlflow["command"][mlflow["command"].index("--root") + 1]
    assert [m["mountPath"] for m in mlflow["volumeMounts"] if m["name"] == "mlflow"] == [root], \
        "the SQLite fallback lives on the PersistentVolumeClaim"
    assert root == "/home/ray/mlflow-server" and root in TRACKING_ENV.read_text()


def test_kuberay_service_account_annotations_uncomment_to_valid_yaml():
    """The commented IRSA / Workload Identity annotations become the account's annotation when
    uncommented as the comment says (and the manifest still validates)."""
    text = (CLUSTER / "kuberay.yaml").read_text()
    schema = raycluster_schema()
    for key in ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"):
        assert f"# {key}: " in text, key
        edited = re.sub(r"^  # annotations:$", "  annotations:", text, count=1, flags=re.M)
        edited = re.sub(r"^    # (" + re.escape(key) + ":)", r"    \1", edited, count=1, flags=re.M)
        documents = {d["kind"]: d for d in yaml.safe_load_all(edited) if d}
        assert list(documents["ServiceAccount"]["metadata"]["annotations"]) == [key]
        jsonschema.validate(documents["RayCluster"], schema)


def test_image_is_built_from_the_pinned_versions():
    pins = {}
    for line in (CLUSTER / "image-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert {k: pins[k] for k in ("ray", "mlflow", "optuna", "torch")} == {
        "ray": "2.60.0", "mlflow": "3.17.2", "optuna": "5.1.0", "torch": "2.13.0"}
    assert pins["ray"] == ray.__version__, "the base image's Ray"
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cluster"]]
    # Exactly the direct dependencies (psycopg, google-cloud-storage and nvidia-ml-py are in the cluster
    # extra; psycopg-binary is psycopg's [binary] extra, which constraints cannot name), each pinned at a
    # version its own bound allows.
    assert sorted(pins) == sorted({r.name.lower().replace("_", "-") for r in direct} | {"psycopg-binary"})
    assert pins["psycopg-binary"] == pins["psycopg"]
    for requirement in direct:
        version = pins[requirement.name.lower().replace("_", "-")]
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} vs =={version}"

    text = (PROJECT_ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py311-gpu", text, re.M).group(1)
    assert base == pins["ray"]
    pins_file = "study/cluster/image-constraints.txt"
    copy_line = text.index(f"COPY --chown=ray:users {pins_file} {pins_file}")
    install = text.index('pip install --no-cache-dir -c study/cluster/image-constraints.txt ".[cluster]"')
    assert copy_line < install < text.index("COPY --chown=ray:users . ."), "the pins are in the build context first"
    header = text.split("FROM")[0]
    assert header.index("docker login ghcr.io") < header.index("docker push")


def test_pyproject_bounds():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "ray[tune]>=2.52" in project["dependencies"], "token authentication exists from Ray 2.52"
    assert {"ray[default]>=2.52", "nvidia-ml-py>=12", "psycopg[binary]>=3.1", "google-cloud-storage>=2.10"} <= set(
        extras["cluster"])
    assert {"ray[default]>=2.52", "psycopg[binary]>=3.1"} <= set(extras["dev"])


# --- docs/cluster-steps.md -------------------------------------------------------------------------


def _sections() -> dict[str, str]:
    text = STEPS.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def _commands(section: str) -> list[str]:
    """The shell lines of a section's code blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_steps_for_each_cluster_authenticate_before_they_submit():
    sections = _sections()
    for title in ("AWS", "GCP", "KubeRay"):
        (section,) = [s for name, s in sections.items() if name.startswith(title)]
        commands = _commands(section)
        joined = "\n".join(commands)
        first_use = min(joined.index(c) for c in ("ray job submit", "ray dashboard", "kubectl port-forward")
                        if c in joined)
        assert joined.index("export RAY_AUTH_MODE=token") < first_use, title
        assert "--dry-run" in joined and "ray job logs" in joined and "--follow" in joined, title
        assert "python -m analysis.report --study literature_priors-full" in joined, title
        assert "docker login ghcr.io" in joined and joined.index("docker login ghcr.io") < joined.index("docker push")
        if title == "KubeRay":
            assert "RAY_AUTH_TOKEN=$(kubectl get secret glioma-study" in joined
            assert "kubectl create secret docker-registry glioma-study-registry --docker-server=ghcr.io" in joined
            assert "kubectl create secret generic glioma-study-tracking --from-env-file=study/cluster/tracking.env" \
                in joined
        else:
            assert joined.index("ray get-auth-token --generate") < joined.index("ray up"), title
            assert "ray down" in joined and "-p 5000" in joined, title
    assert f"--name {AMI_SSM_PARAMETER}" in STEPS.read_text()
    assert "Run here and on paper" in sections


def test_steps_policies_are_json_and_name_the_profile():
    """The IAM documents the AWS steps write (heredocs that fill in $BUCKET and $ACCOUNT_ID) are
    JSON and grant what the nodes and the autoscaler need."""
    text = STEPS.read_text()
    documents = dict(re.findall(r"cat > (\S+\.json) <<EOF\n(.*?)\n\s*EOF\n", text, re.S))
    assert set(documents) == {"glioma-study-trust.json", "glioma-study-s3.json", "glioma-study-autoscaler.json"}
    policies = [json.loads(d.replace("${BUCKET}", "BUCKET").replace("${ACCOUNT_ID}", "ACCOUNT_ID"))
                for d in documents.values()]
    actions = {a for p in policies for s in p["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str)
                                                                      else s["Action"])}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "ec2:RunInstances", "ec2:TerminateInstances",
            "ec2:CreateTags", "ec2:DescribeInstances", "iam:PassRole"} <= actions
    passrole = [s for p in policies for s in p["Statement"] if s["Action"] == "iam:PassRole"]
    assert passrole and all(s["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/glioma-study" for s in passrole)
    assert "--instance-profile-name glioma-study" in text


def test_steps_study_commands_parse():
    """Every `python -m study.run` in the steps is a command line the study accepts."""
    from study.run import build_parser

    found = 0
    for command in _commands(STEPS.read_text()):
        if "python -m study.run" in command:
            words = shlex.split(command.split("python -m study.run", 1)[1])
            args = build_parser().parse_args(words)
            assert args.space == "literature_priors" and args.gpus_per_trial == 1
            # The clouds' head serves MLflow on 5000; a Slurm dry run tracks nothing.
            assert args.tracking_uri == "http://127.0.0.1:5000" or args.dry_run
            found += 1
    assert found >= 6, "a dry run and a study on each of the three clusters"


def test_tracking_server_refuses_a_database_or_bucket_it_cannot_use(tmp_path, capsys):
    """Checked before MLflow starts: its own server retries and logs a traceback per worker."""
    from tests.services import free_port
    from study.tracking.server import main

    port = str(free_port())
    assert main(["serve", "--root", str(tmp_path), "--port", port, "--backend-store-uri", "mongodb://db/x"]) == 2
    assert "not a database URI" in capsys.readouterr().err
    assert main(["serve", "--root", str(tmp_path), "--port", port, "--backend-store-uri",
                 f"postgresql://mlflow:SECRET@127.0.0.1:{free_port()}/mlflow"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "SECRET" not in err, "the password is never printed"
