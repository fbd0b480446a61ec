#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine (the controller builds images with it).
# Installs docker.io and debootstrap from Debian when missing; starts dockerd through the init
# system when there is one, else directly (our CI machines have no systemd), then waits.
set -euo pipefail

timeout_s="${DOCKER_START_TIMEOUT:-60}"

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
  exit 0
fi

if [ -d /run/systemd/system ]; then
  systemctl start docker
else
  echo "no init system: starting dockerd directly (log: /var/log/dockerd.log)"
  setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
fi

for _ in $(seq "$timeout_s"); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not answer within ${timeout_s}s; see /var/log/dockerd.log" >&2
exit 1
