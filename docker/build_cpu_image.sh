#!/usr/bin/env bash
# The CPU variant of docker/Dockerfile, built without any container registry: a Debian bookworm
# base made here (debootstrap + podman import) with a virtualenv holding this machine's CPU torch
# wheel, then docker/Dockerfile with BASE_IMAGE pointing at it; --tiny then runs the tiny TP=2 x
# PP=2 conversion in the image (the remaining arguments are its config overrides).
#
#   docker/build_cpu_image.sh [--image IMAGE] [--tiny [key.sub=value ...]]
#
# Debian bookworm's Python is 3.11, so this image gets megatron-core 0.16.x, the older tested
# release (setup.py picks it by Python); NGC's Python 3.12 images get 0.19.x. A 3.12 CPU image would
# need a CPU torch wheel for 3.12, which this machine's package index does not offer (its torch
# 2.13.0 for 3.12 is the 3.6 GB CUDA build).
#
# Needs root, podman and debootstrap (apt-get install podman runc debootstrap); exit code 3 when
# they are missing. The torch wheel is what `pip download torch==2.13.0` finds through pip's
# configuration (find-links), so no CUDA packages are fetched; TORCH overrides the requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=localhost/megalign-cpu
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --image) IMAGE=$2; shift 2 ;;
    --tiny) TINY=1; shift; break ;;
    *) echo "usage: build_cpu_image.sh [--image IMAGE] [--tiny [key.sub=value ...]]" >&2; exit 2 ;;
  esac
done
TORCH=${TORCH:-torch==2.13.0}

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "build_cpu_image.sh: $tool is not installed" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "build_cpu_image.sh: debootstrap and podman import need root" >&2; exit 3; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Podman without systemd: runc, cgroupfs, a file event log, and this shell's limits (podman's
# defaults are above what a sandboxed host may grant): its open-file limit.
podman() {
  command podman --runtime=runc --cgroup-manager=cgroupfs --events-backend=file "$@"
}
NOFILE="nofile=$(ulimit -Sn):$(ulimit -Hn)"

python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK/wheels" "$TORCH"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
  "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
cp "$WORK"/wheels/*.whl "$WORK/rootfs/tmp/"
# The image trusts what this machine trusts (pip also works behind a TLS-inspecting proxy).
cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
env -i PATH=/usr/bin:/bin PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$(command -v chroot)" "$WORK/rootfs" /bin/sh -c \
  'python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-cache-dir /tmp/*.whl && rm /tmp/*.whl'
tar -C "$WORK/rootfs" -c . | podman import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["bash"]' - "$IMAGE-base"
podman build --network=host --ulimit="$NOFILE" --build-arg "BASE_IMAGE=$IMAGE-base" \
  -f docker/Dockerfile -t "$IMAGE" .
if [ "$TINY" = 1 ]; then
  podman run --rm --network=none --ulimit="$NOFILE" "$IMAGE" tiny "$@"
fi
