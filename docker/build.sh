#!/usr/bin/env bash
# Build the dfu-kfp component images and record their references in docker/images.json, which
# `dfu-kfp compile` reads to pin the pipeline's images ({"cpu": REF, "gpu": REF}).
#
#   bash docker/build.sh [--cpu-only] [--base-image IMG] [--gpu-base-image IMG]
#                        [--no-imagenet-weights] [--ca-bundle FILE] [--push] [--images-json FILE]
#
# Engine: docker when `docker info` answers, else podman (override: DFU_CONTAINER_ENGINE=podman).
# Names: ${DFU_REGISTRY:-localhost}/dfu-kfp-{cpu,gpu}:<dfu_ml.__version__>.
# --base-image      BASE_IMAGE of the CPU image (e.g. localhost/debian-base:bookworm in CI)
# --gpu-base-image  BASE_IMAGE of the GPU image (default: the Dockerfile's, plain Python: torch's
#                   wheels carry CUDA)
# --no-imagenet-weights  do not bake Keras's ImageNet weights files into the GPU image (baked by
#                   default: `backbone_weights: imagenet` finds them there; needs internet here)
# --ca-bundle FILE  CA bundle for HTTPS through a TLS-intercepting proxy, given to pip and the
#                   weights download only, as the build secret `pip-cert` (never stored in the image)
# --push            push, then record the registry's manifest digest
# --images-json F   where to write the references (default docker/images.json)
#
# References are NAME:TAG@sha256:DIGEST. Without --push, DIGEST is podman's local manifest digest
# (podman run resolves it locally) or, with docker, the image id (an identifier only: no registry
# or daemon resolves NAME@<image id>). Push before compiling a pipeline for a cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CPU_ONLY=0 PUSH=0 BASE_IMAGE="" GPU_BASE_IMAGE="" CA_BUNDLE="" IMAGENET_WEIGHTS=1
IMAGES_JSON="$ROOT/docker/images.json"

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) CPU_ONLY=1 ;;
    --push) PUSH=1 ;;
    --no-imagenet-weights) IMAGENET_WEIGHTS=0 ;;
    --base-image) BASE_IMAGE=${2:?--base-image needs a value}; shift ;;
    --gpu-base-image) GPU_BASE_IMAGE=${2:?--gpu-base-image needs a value}; shift ;;
    --ca-bundle) CA_BUNDLE=${2:?--ca-bundle needs a value}; shift ;;
    --images-json) IMAGES_JSON=${2:?--images-json needs a value}; shift ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${DFU_CONTAINER_ENGINE:-}" ]; then
  ENGINE=$DFU_CONTAINER_ENGINE
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  ENGINE=docker
elif command -v podman >/dev/null 2>&1; then
  ENGINE=podman
else
  echo "build.sh: neither a working docker nor podman found" >&2; exit 1
fi

# Parsed, not imported: the host needs no Python environment for this.
VERSION=$(sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$ROOT/dfu_ml/__init__.py")
[ -n "$VERSION" ] || { echo "build.sh: no __version__ in dfu_ml/__init__.py" >&2; exit 1; }
REGISTRY=${DFU_REGISTRY:-localhost}
if [ -n "$CA_BUNDLE" ] && [ ! -r "$CA_BUNDLE" ]; then
  echo "build.sh: cannot read CA bundle $CA_BUNDLE" >&2; exit 1
fi

# build KIND BASE: builds (and pushes) one image and sets REF to the reference to record.
# Not called as $(build ...): errexit does not reach into command substitutions.
build() {
  local kind=$1 base=$2 image="$REGISTRY/dfu-kfp-$1:$VERSION"
  local args=(build -f "$ROOT/docker/Dockerfile.$kind" -t "$image")
  [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
  if [ "$kind" = gpu ]; then args+=(--build-arg "IMAGENET_WEIGHTS=$IMAGENET_WEIGHTS"); fi
  if [ -n "$CA_BUNDLE" ]; then
    # RUN --mount=type=secret,id=pip-cert in the Dockerfiles; docker needs BuildKit (its default)
    args+=(--secret "id=pip-cert,src=$CA_BUNDLE" --build-arg PIP_CERT=/run/secrets/pip-cert)
  fi
  if [ "$ENGINE" = podman ]; then
    # host network: no NAT rules on the build host. podman 4.3 reads <Dockerfile>.dockerignore by
    # itself; passing it explicitly also covers older versions.
    args+=(--network host --ignorefile "$ROOT/docker/Dockerfile.$kind.dockerignore")
  fi
  echo "+ $ENGINE ${args[*]} $ROOT" >&2
  "$ENGINE" "${args[@]}" "$ROOT" >&2

  if [ "$PUSH" = 1 ]; then
    if [ "$ENGINE" = podman ]; then
      local digestfile; digestfile=$(mktemp)
      podman push --digestfile "$digestfile" "$image" >&2
      REF="$image@$(cat "$digestfile")"; rm -f "$digestfile"
    else
      docker push "$image" >&2
      REF="$image@$(docker image inspect --format '{{index .RepoDigests 0}}' "$image" | sed 's/.*@//')"
    fi
  elif [ "$ENGINE" = podman ]; then
    REF="$image@$(podman image inspect --format '{{.Digest}}' "$image")"
  else
    REF="$image@$(docker image inspect --format '{{.Id}}' "$image")"
  fi
  case "$REF" in *@sha256:????????????????????????????????????????????????????????????????) ;;
    *) echo "build.sh: no digest for $image (got $REF)" >&2; exit 1 ;;
  esac
}

build cpu "$BASE_IMAGE"; CPU_REF=$REF
if [ "$CPU_ONLY" = 1 ]; then
  GPU_REF="$REGISTRY/dfu-kfp-gpu:$VERSION"   # not built: tag only
else
  build gpu "$GPU_BASE_IMAGE"; GPU_REF=$REF
fi

printf '{\n  "cpu": "%s",\n  "gpu": "%s"\n}\n' "$CPU_REF" "$GPU_REF" > "$IMAGES_JSON"
echo "wrote $IMAGES_JSON:" >&2
cat "$IMAGES_JSON"
