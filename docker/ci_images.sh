#!/usr/bin/env bash
# CI check of the component image: build it with podman (no Docker daemon, no registry here) on a
# local debootstrap Debian base, then run the component CLIs and a tiny step chain inside it.
#   bash docker/ci_images.sh          (as root; state kept under ${DFU_CI_CACHE:-/var/tmp/dfu-kfp-ci})
# Prints `SKIP: ...` and exits 0 when podman cannot be installed or cannot run on this machine.
#
# The images built here also serve docker-py and the docker CLI through podman's Docker-compatible
# API; .ci/run starts it for tests/test_docker_runner.py (kfp.local.DockerRunner). By hand, with
# C=${DFU_CI_CACHE:-/var/tmp/dfu-kfp-ci}:
#   export CONTAINERS_STORAGE_CONF=$C/conf/storage.conf CONTAINERS_CONF=$C/conf/containers.conf
#   podman system service --time=0 unix://$C/podman.sock &    # kill its pid when done
#   export DOCKER_HOST=unix://$C/podman.sock DFU_DOCKER_HOST=unix://$C/podman.sock
set -euo pipefail

# ===================== commands run inside the image: adjust when the CLIs change =====================
HELP_STEPS=(prepare resample_alpha clinical_rf pretrain_image stage1 stage2 evaluate publish)
# run in order, each in a fresh container, with a host folder mounted at /work (as uid 1000)
CHAIN=(
  "dfu-kfp synth --out /work/data --patients 12 --seed 0 --image-scale 0.1"
  "python -m components.prepare --data /work/data --config smoke --out /work/prepared"
  "python -m components.resample_alpha --prepared /work/prepared --fold 0 --config smoke --out /work/fold0"
  "python -m components.pretrain_image --prepared /work/prepared --fold-plan /work/fold0 --modality depth_rgb --config smoke --out /work/encoder"
)
# files the chain must leave in that folder, owned by uid 1000
CHAIN_OUTPUTS=(prepared/dataset.npz encoder/encoder.keras)
# =======================================================================================================

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DFU_CI_CACHE:-/var/tmp/dfu-kfp-ci}
BASE=localhost/debian-base:bookworm
MIRROR=${DFU_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=/etc/ssl/certs/ca-certificates.crt
JOB_START=$(date +%s)
PHASE_START=$JOB_START
FAILED=()

phase_done() {  # phase_done NAME: print the seconds since the previous phase ended
  local now; now=$(date +%s)
  echo "== phase $1: $((now - PHASE_START)) s"
  PHASE_START=$now
}
finish() { echo "== ci_images.sh total: $(($(date +%s) - JOB_START)) s"; }
trap finish EXIT
skip() { echo "SKIP: $*"; exit 0; }

# --- 1. podman and friends --------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "podman cannot be installed: needs root (apt, rootful podman)"
missing=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if ! out=$( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      podman buildah debootstrap runc) 2>&1); then
    skip "podman cannot be installed: $(echo "$out" | grep -E '^E:' | head -1 || echo "$out" | tail -1)"
  fi
fi
phase_done apt-install

# --- 2. settings this host needs (see shared docs CONTAINERS.md): nothing under /etc changes ---------
mkdir -p "$CACHE/conf" "$CACHE/storage"
cat > "$CACHE/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "/run/dfu-kfp-ci/storage"
EOF
# crun fails on this host's hybrid cgroups; the default ulimits exceed what root may set here
cat > "$CACHE/conf/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_STORAGE_CONF=$CACHE/conf/storage.conf CONTAINERS_CONF=$CACHE/conf/containers.conf
out=$(podman info 2>&1) || skip "podman cannot run here: $(echo "$out" | tail -1)"
phase_done podman-config

# --- 3. the base image: debootstrap minbase, tarball cached -------------------------------------------
if ! podman image exists "$BASE"; then
  if [ ! -s "$CACHE/debian-bookworm-minbase.tar" ]; then
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; echo "FAIL: debootstrap"; exit 1; }
    rm -rf "$CACHE/rootfs/var/cache/apt/archives/"*.deb "$CACHE/rootfs/var/lib/apt/lists/"*   # ~80 MB
    tar -C "$CACHE/rootfs" -cf "$CACHE/debian-bookworm-minbase.tar.tmp" .
    mv "$CACHE/debian-bookworm-minbase.tar.tmp" "$CACHE/debian-bookworm-minbase.tar"
    rm -rf "$CACHE/rootfs"
  fi
  podman import "$CACHE/debian-bookworm-minbase.tar" "$BASE" >/dev/null
fi
phase_done base-image

# --- 4. the CPU image ------------------------------------------------------------------------------
build_args=(--cpu-only --base-image "$BASE" --images-json "$CACHE/images.json")
[ -r "$CA" ] && build_args+=(--ca-bundle "$CA")
DFU_CONTAINER_ENGINE=podman bash "$ROOT/docker/build.sh" "${build_args[@]}"
podman image prune -f >/dev/null   # earlier builds' layers: keeps the cache from growing per run
IMAGE=$(sed -n 's/.*"cpu": "\([^@"]*\).*/\1/p' "$CACHE/images.json")   # name:tag, without the id
echo "image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
phase_done image-build

# --- 5. inside the image, as its own non-root user -----------------------------------------------------
run() { podman run --rm --network host "$@"; }
run "$IMAGE" python -c "import dfu_ml, kfp, tensorflow, keras; print('ok')" || { echo "FAIL: import smoke check"; exit 1; }
[ "$(run "$IMAGE" id -u)" = 1000 ] || { echo "FAIL: image does not run as uid 1000"; exit 1; }
phase_done smoke

for step in "${HELP_STEPS[@]}"; do
  run "$IMAGE" python -m "components.$step" --help >/dev/null || FAILED+=("components.$step --help")
done
phase_done help

WORK=$CACHE/work
rm -rf "$WORK" && mkdir -p "$WORK" && chmod 0777 "$WORK"   # the image's uid 1000 writes here
for cmd in "${CHAIN[@]}"; do
  t=$(date +%s)
  echo "+ $cmd"
  if ! run -v "$WORK:/work" -w /work "$IMAGE" sh -c "$cmd"; then
    FAILED+=("$cmd"); break
  fi
  echo "  ($(($(date +%s) - t)) s)"
done
if [ ${#FAILED[@]} -eq 0 ]; then
  for f in "${CHAIN_OUTPUTS[@]}"; do
    if [ ! -e "$WORK/$f" ]; then FAILED+=("missing output $f")
    elif [ "$(stat -c %u "$WORK/$f")" != 1000 ]; then FAILED+=("$f not owned by uid 1000"); fi
  done
fi
phase_done step-chain

if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAIL: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "OK: image $IMAGE built and its steps ran"
