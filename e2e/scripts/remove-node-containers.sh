#!/usr/bin/env bash
# Removes every container a kubelet started on this machine's Docker daemon (they carry kubelet labels) and
# the tmpfs and bind mounts its pods' volumes left under a kubelet root directory, if given. With
# --mounts-only, only the mounts (the containers may belong to another node by now).
#
# usage: remove-node-containers.sh [--mounts-only] [KUBELET_ROOT_DIR]
set -uo pipefail

docker="${DOCKER:-docker}"
if [[ "${1:-}" == --mounts-only ]]; then
  shift
else
  ids="$("$docker" ps -aq --filter label=io.kubernetes.pod.uid 2>/dev/null)"
  [[ -n "$ids" ]] && "$docker" rm -f $ids >/dev/null 2>&1
fi
root="${1:-}"
if [[ -n "$root" && -d "$root" ]]; then
  # Deepest first.
  awk -v root="$root" '$2 ~ "^"root {print $2}' /proc/mounts | sort -r | while read -r mount; do
    umount -l "$mount" 2>/dev/null
  done
fi
exit 0
