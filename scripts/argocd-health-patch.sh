#!/usr/bin/env bash
# Prints a merge patch for ArgoCD's argocd-cm with a health check for every Flywheel kind
# (charts/flywheel/argocd/<Kind>.lua, each prefixed with common.lua):
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file <(scripts/argocd-health-patch.sh)
set -euo pipefail
dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../charts/flywheel/argocd" && pwd)"
echo "data:"
for kind in FeatureView TrainingJob ModelVersion Rollout GPUQuota; do
  echo "  resource.customizations.health.flywheel.dev_${kind}: |"
  cat "$dir/common.lua" "$dir/$kind.lua" | sed 's/^/    /'
done
