"""Static checks of the Kubernetes manifests under manifests/ (no cluster needed).

Every YAML document is parsed; every kustomization's resources must exist; every Kubernetes
object must pass kubernetes-validate's strict schema for a recent Kubernetes version.
"""

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
KUSTOMIZE_API = "kustomize.config.k8s.io/"
# What the pipeline's GPU steps select and tolerate (the pipeline config must use the same values).
GPU_LABEL = ("dfu-kfp/node-pool", "gpu")
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
BUCKETS = ("dfu-data", "dfu-models", "mlpipeline")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict]]:
    files = sorted(MANIFESTS.rglob("*.yaml")) + sorted(MANIFESTS.rglob("*.yml"))
    return [(f, d) for f in files for d in _docs(f)]


def _k8s_objects() -> list[tuple[Path, dict]]:
    return [(f, d) for f, d in _all_docs() if not d.get("apiVersion", "").startswith(KUSTOMIZE_API)]


def _kustomization_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def _resolve(kustomization: Path) -> list[Path]:
    """The resource files a kustomization builds from, following directory resources."""
    (doc,) = _docs(kustomization)
    files = []
    for entry in doc.get("resources", []):
        target = (kustomization.parent / entry).resolve()
        assert target.exists(), f"{kustomization}: resource {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{target}: no kustomization.yaml"
            files += _resolve(target / "kustomization.yaml")
        else:
            files.append(target)
    return files


def _base_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for f in _resolve(MANIFESTS / "base" / "kustomization.yaml"):
        for d in _docs(f):
            objs[(d["kind"], d["metadata"]["name"])] = d
    return objs


def test_every_yaml_parses_and_has_kind():
    docs = _all_docs()
    assert docs, "no manifests found"
    for f, d in docs:
        assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{f}: not an object"


def test_kustomizations_resolve():
    assert {p.relative_to(MANIFESTS).as_posix() for p in _kustomization_files()} >= {
        "base/kustomization.yaml",
        "overlays/dev/kustomization.yaml",
    }
    for k in _kustomization_files():
        assert _resolve(k), f"{k}: no resources"
    # everything in base/ is built by its kustomization
    listed = set(_resolve(MANIFESTS / "base" / "kustomization.yaml"))
    on_disk = {
        p.resolve() for p in (MANIFESTS / "base").glob("*.yaml") if p.name != "kustomization.yaml"
    }
    assert on_disk == listed


def test_overlay_sets_namespace_and_base_does_not():
    (dev,) = _docs(MANIFESTS / "overlays" / "dev" / "kustomization.yaml")
    assert dev.get("namespace") == "dfu-kfp-dev"
    for (kind, name), obj in _base_objects().items():
        assert "namespace" not in obj["metadata"], f"{kind}/{name} hard-codes a namespace"


def test_dev_overlay_owns_its_namespace_and_patches_only_its_launcher_configmap():
    """The dev overlay must not replace the kfp-launcher ConfigMap of a namespace it does not
    own (standalone KFP's `kubeflow`): it creates its namespace and patches its own copy."""
    overlay = MANIFESTS / "overlays" / "dev"
    (dev,) = _docs(overlay / "kustomization.yaml")
    created = [d for f in _resolve(overlay / "kustomization.yaml") for d in _docs(f)]
    assert {"kind": "Namespace", "name": dev["namespace"]} in [
        {"kind": d["kind"], "name": d["metadata"]["name"]} for d in created
    ]
    assert dev["namespace"] != "kubeflow"
    (patch,) = dev["patches"]
    assert patch["target"] == {"kind": "ConfigMap", "name": "kfp-launcher"}
    (op,) = yaml.safe_load(patch["patch"])
    assert op["path"] == "/data/defaultPipelineRoot"
    assert op["value"].endswith("/" + dev["namespace"])


@pytest.mark.parametrize(
    "path_and_obj", _k8s_objects(), ids=lambda fo: f"{fo[0].name}:{fo[1]['kind']}"
)
def test_objects_validate_against_kubernetes_schema(path_and_obj):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    path, obj = path_and_obj
    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(
            f"{path}: {obj['kind']} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}"
        )


# The two secrets: MinIO's root login, and the pipeline's own MinIO user.
ROOT_SECRET, PIPELINE_SECRET = "dfu-minio-root", "dfu-kfp-s3"
SECRET_KEYS = {
    ROOT_SECRET: ("rootUser", "rootPassword"),
    PIPELINE_SECRET: ("accesskey", "secretkey"),
}


@pytest.mark.parametrize("name", sorted(SECRET_KEYS))
def test_secret_is_a_template_with_placeholders_only(name):
    secret = _base_objects()[("Secret", name)]
    assert "data" not in secret, (
        "base64 data could hide a real credential: use stringData placeholders"
    )
    values = secret["stringData"]
    user, password = SECRET_KEYS[name]
    assert set(values) == {user, password}
    for key, value in values.items():
        assert re.fullmatch(r"(CHANGE|REPLACE)[-_]ME[-_A-Za-z0-9]*", value), (
            f"{key} is not a placeholder"
        )
    # MinIO refuses a root password or a user secret under 8 characters: the placeholder too
    assert len(values[password]) >= 8


def test_no_credentials_anywhere_else():
    for f, d in _k8s_objects():
        if d["kind"] == "Secret":
            continue
        text = yaml.safe_dump(d)
        assert not re.search(r"(?i)(password|secretkey|accesskey)\s*:\s*[^\s{]", text), f
        assert "minio123" not in text and "minioadmin" not in text, (
            f"{f}: default MinIO credentials"
        )


def test_kfp_launcher_configmap():
    cm = _base_objects()[("ConfigMap", "kfp-launcher")]
    root = cm["data"]["defaultPipelineRoot"]
    assert re.fullmatch(r"(minio|s3)://mlpipeline/dfu-kfp", root)
    providers = yaml.safe_load(cm["data"]["providers"])
    scheme = root.split("://")[0]
    ref = providers[scheme]["default"]["credentials"]["secretRef"]
    assert ref == {
        "secretName": "dfu-kfp-s3",
        "accessKeyKey": "accesskey",
        "secretKeyKey": "secretkey",
    }
    assert providers[scheme]["default"]["endpoint"].split(":")[0] == "dfu-minio"


def _secret_refs(container) -> set:
    return {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}


def test_minio_and_bucket_job_use_pinned_images_and_the_secret():
    objs = _base_objects()
    deploy = objs[("Deployment", "dfu-minio")]
    job = objs[("Job", "dfu-minio-buckets")]
    (minio,) = deploy["spec"]["template"]["spec"]["containers"]
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"minio/minio:RELEASE\.20(24|25)-\d\d-\d\dT\d\d-\d\d-\d\dZ", minio["image"])
    assert re.fullmatch(r"minio/mc:RELEASE\.20(24|25)-\d\d-\d\dT\d\d-\d\d-\d\dZ", mc["image"])
    assert _secret_refs(minio) == {ROOT_SECRET}
    assert _secret_refs(mc) == {ROOT_SECRET, PIPELINE_SECRET}
    script = " ".join(mc["args"])
    for bucket in BUCKETS:
        assert bucket in script
    claim = deploy["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objs
    service = objs[("Service", "dfu-minio")]
    assert (
        service["spec"]["selector"].items()
        <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )


def test_runner_rbac_is_read_only_and_scoped():
    objs = _base_objects()
    role = objs[("Role", "dfu-kfp-runner")]
    granted = set()
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get"}, rule
        assert "*" not in rule["resources"] and rule.get("resourceNames"), rule
        granted |= {(r, n) for r in rule["resources"] for n in rule["resourceNames"]}
    assert granted == {("secrets", "dfu-kfp-s3"), ("configmaps", "kfp-launcher")}
    binding = objs[("RoleBinding", "dfu-kfp-runner")]
    assert binding["roleRef"]["name"] == "dfu-kfp-runner"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dfu-kfp-runner"}]
    assert ("ServiceAccount", "dfu-kfp-runner") in objs


def test_gpu_node_label_and_taint():
    (node,) = _docs(MANIFESTS / "gpu-nodepool.yaml")
    assert node["kind"] == "Node"
    key, value = GPU_LABEL
    assert node["metadata"]["labels"] == {key: value}
    assert node["spec"]["taints"] == [GPU_TAINT]
    text = (MANIFESTS / "gpu-nodepool.yaml").read_text()
    assert f"{key}={value}" in text and "nvidia.com/gpu=present:NoSchedule" in text


# ---------------------------------------------------------------- credentials and hardening


def _pod_specs() -> dict[str, dict]:
    """Every pod template of the base: workload name -> pod spec."""
    return {
        name: obj["spec"]["template"]["spec"]
        for (kind, name), obj in _base_objects().items()
        if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    }


def test_the_pipeline_never_gets_the_root_login():
    from pipelines.pipeline import S3_ENV
    from pipelines.settings import RuntimeSettings

    # The pipeline's path to credentials: the steps' secret, the launcher's, the runner's RBAC.
    assert RuntimeSettings().s3_secret_name == PIPELINE_SECRET
    assert set(S3_ENV) == set(SECRET_KEYS[PIPELINE_SECRET])
    objs = _base_objects()
    launcher = yaml.safe_load(objs[("ConfigMap", "kfp-launcher")]["data"]["providers"])
    assert launcher["minio"]["default"]["credentials"]["secretRef"]["secretName"] == PIPELINE_SECRET
    # Only MinIO itself and the Job that creates the pipeline's user see the root login.
    readers = {name for (kind, name), obj in objs.items() if ROOT_SECRET in yaml.safe_dump(obj)}
    assert readers == {ROOT_SECRET, "dfu-minio", "dfu-minio-buckets"}
    root = objs[("Secret", ROOT_SECRET)]["stringData"]
    pipeline = objs[("Secret", PIPELINE_SECRET)]["stringData"]
    assert root["rootUser"] != pipeline["accesskey"]


def _policy() -> dict:
    (cm,) = [o for (k, n), o in _base_objects().items() if n == "dfu-minio-pipeline-policy"]
    return json.loads(cm["data"]["pipeline-policy.json"])


def _allowed(policy: dict, resource: str) -> set:
    """The actions the policy allows on ``resource`` (an ARN), following * in its resources."""
    allowed = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        if any(fnmatch.fnmatchcase(resource, r) for r in statement["Resource"]):
            allowed |= set(statement["Action"])
    return allowed


def test_the_pipeline_policy_is_least_privilege():
    policy = _policy()
    for statement in policy["Statement"]:
        assert not any("*" in action for action in statement["Action"]), statement
        assert "*" not in statement["Resource"] and "arn:aws:s3:::*" not in statement["Resource"]
    buckets = {r.split(":::")[1].split("/")[0] for s in policy["Statement"] for r in s["Resource"]}
    assert buckets == set(BUCKETS)
    arn = "arn:aws:s3:::"
    assert _allowed(policy, f"{arn}dfu-data/study/labels.csv") == {"s3:GetObject"}
    for bucket in BUCKETS:
        assert "s3:ListBucket" in _allowed(policy, f"{arn}{bucket}")
    published = f"{arn}dfu-models/dfu/dfu-0.1.0-0123456789abcdef/_SUCCESS"
    assert {"s3:GetObject", "s3:PutObject"} <= _allowed(policy, published)
    assert "s3:DeleteObject" not in _allowed(policy, published)
    staged = f"{arn}dfu-models/dfu/dfu-0.1.0-0123456789abcdef/_versions/v1/model.keras"
    assert "s3:DeleteObject" in _allowed(policy, staged)
    assert {"s3:GetObject", "s3:PutObject"} <= _allowed(policy, f"{arn}mlpipeline/dfu-kfp/x")
    job = _base_objects()[("Job", "dfu-minio-buckets")]["spec"]["template"]["spec"]
    (volume,) = [v for v in job["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == "dfu-minio-pipeline-policy"
    (mount,) = [m for m in job["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert f"{mount['mountPath']}/pipeline-policy.json" in job["containers"][0]["args"][0]


@pytest.mark.parametrize("workload", sorted(_pod_specs()))
def test_every_pod_is_hardened(workload):
    pod = _pod_specs()[workload]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod.get("automountServiceAccountToken") is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        # The writable paths are volumes: /tmp, and what MinIO writes (data, its HOME).
        assert "emptyDir" in mounts["/tmp"]
        home = next((e["value"] for e in container["env"] if e["name"] == "HOME"), None)
        if home is not None:
            assert "emptyDir" in mounts[home]


def _job_script():
    job = _base_objects()[("Job", "dfu-minio-buckets")]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return job, container["args"][0], env


FAKE_MC = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in
  "alias set"*) [ -z "$MC_DOWN" ] ;;
  "admin policy attach"*) [ -z "$MC_ATTACHED" ] || { echo "already in effect" >&2; exit 1; } ;;
  "admin user info"*) echo "PolicyName: dfu-kfp-pipeline" ;;
esac
"""


def _run_job_script(tmp_path, **fake):
    """Run the bucket Job's script with a fake ``mc`` (and ``sleep``) that record their calls."""
    _, script, env = _job_script()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"mc": FAKE_MC, "sleep": '#!/bin/sh\necho "sleep $*" >> "$CALLS"\n'}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    env = {
        **env,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "ROOT_USER": "root-user",
        "ROOT_PASSWORD": "root-password",
        "PIPELINE_ACCESS_KEY": "pipeline-user",
        "PIPELINE_SECRET_KEY": "pipeline-secret",
        **fake,
    }
    result = subprocess.run(
        ["/bin/sh", "-ec", script], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    return result, calls.read_text().splitlines()


def test_the_bucket_job_is_bounded():
    job, _, env = _job_script()
    assert 1 <= job["spec"]["backoffLimit"] <= 6
    assert 60 <= job["spec"]["activeDeadlineSeconds"] <= 1800
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # The wait for MinIO fits in the deadline (each try may also take mc's own timeout).
    assert int(env["WAIT_TRIES"]) * int(env["WAIT_SECONDS"]) < job["spec"]["activeDeadlineSeconds"]


def test_the_bucket_job_gives_up_waiting_for_minio(tmp_path):
    result, calls = _run_job_script(tmp_path, MC_DOWN="1")
    _, _, env = _job_script()
    tries = int(env["WAIT_TRIES"])
    assert result.returncode == 1
    assert f"did not answer after {tries} tries" in result.stderr
    assert sum(c.startswith("alias set") for c in calls) == tries
    assert sum(c.startswith("sleep") for c in calls) == tries - 1
    assert not any(c.startswith(("mb", "admin")) for c in calls)


@pytest.mark.parametrize("attached", ["", "1"], ids=["new-user", "rerun"])
def test_the_bucket_job_creates_the_buckets_and_the_pipeline_user(tmp_path, attached):
    result, calls = _run_job_script(tmp_path, MC_ATTACHED=attached)
    assert result.returncode == 0, result.stderr
    assert calls[0] == "alias set dfu http://dfu-minio:9000 root-user root-password"
    for bucket in BUCKETS:
        assert f"mb --ignore-existing dfu/{bucket}" in calls
    assert "admin policy create dfu dfu-kfp-pipeline /policy/pipeline-policy.json" in calls
    assert "admin user add dfu pipeline-user pipeline-secret" in calls
    assert "admin policy attach dfu dfu-kfp-pipeline --user pipeline-user" in calls


def test_the_bucket_job_refuses_to_make_the_root_login_the_pipeline_user(tmp_path):
    result, calls = _run_job_script(tmp_path, PIPELINE_ACCESS_KEY="root-user")
    assert result.returncode == 1 and "root user" in result.stderr
    assert not any(c.startswith("admin user add") for c in calls)


def test_pipeline_steps_run_as_the_images_user():
    """The steps' securityContext (pipelines/pipeline.py) names the user the images are built
    with, so a step never runs as root and never as a user the image does not know."""
    from pipelines.pipeline import IMAGE_USER

    docker = MANIFESTS.parent / "docker"
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        users = re.findall(r"^USER\s+(\S+)", (docker / dockerfile).read_text(), re.M)
        assert users[-1] == f"{IMAGE_USER}:{IMAGE_USER}", dockerfile
