"""Static checks of the Kubernetes manifests under manifests/ (no cluster needed).

Every YAML document is parsed; every kustomization's resources must exist; every Kubernetes
object must pass kubernetes-validate's strict schema for a recent Kubernetes version.
"""

import re
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


def test_secret_is_a_template_with_placeholders_only():
    secret = _base_objects()[("Secret", "dfu-kfp-s3")]
    assert "data" not in secret, (
        "base64 data could hide a real credential: use stringData placeholders"
    )
    values = secret["stringData"]
    assert set(values) == {"accesskey", "secretkey"}
    for key, value in values.items():
        assert re.fullmatch(r"(CHANGE|REPLACE)[-_]ME[-_A-Za-z0-9]*", value), (
            f"{key} is not a placeholder"
        )
    # MinIO refuses a root password under 8 characters: the placeholder itself must start
    assert len(values["secretkey"]) >= 8


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


def test_minio_and_bucket_job_use_pinned_images_and_the_secret():
    objs = _base_objects()
    deploy = objs[("Deployment", "dfu-minio")]
    job = objs[("Job", "dfu-minio-buckets")]
    (minio,) = deploy["spec"]["template"]["spec"]["containers"]
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"minio/minio:RELEASE\.20(24|25)-\d\d-\d\dT\d\d-\d\d-\d\dZ", minio["image"])
    assert re.fullmatch(r"minio/mc:RELEASE\.20(24|25)-\d\d-\d\dT\d\d-\d\d-\d\dZ", mc["image"])
    for container in (minio, mc):
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
        }
        assert refs == {"dfu-kfp-s3"}
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
