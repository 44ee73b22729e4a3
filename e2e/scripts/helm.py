#!/usr/bin/env python3
"""Helm without a helm binary: Helm's own Go engine through the helm-sdkpy wheel.

usage:
  helm.py lint CHART
  helm.py install RELEASE CHART NAMESPACE KUBECONFIG [key=value ...]
  helm.py uninstall RELEASE NAMESPACE KUBECONFIG
"""
import asyncio
import json
import sys

import helm_sdkpy


def parse_values(pairs):
    values = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        target = values
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        try:
            target[parts[-1]] = json.loads(raw)
        except json.JSONDecodeError:
            target[parts[-1]] = raw
    return values


async def main(argv):
    if len(argv) >= 2 and argv[0] == "lint":
        result = await helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(argv[1])
        print(json.dumps(result, indent=2, default=str))
        # Helm's lint severities: 1 info, 2 warning, 3 error.
        messages = result.get("Messages") or []
        errors = [m for m in messages if int(m.get("Severity", 0)) >= 3]
        return 1 if errors or result.get("Errors") else 0
    if len(argv) >= 5 and argv[0] == "install":
        release, chart, namespace, kubeconfig = argv[1:5]
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
        result = await helm_sdkpy.Install(config).run(
            release, chart, values=parse_values(argv[5:]), create_namespace=True, wait=False, timeout=120
        )
        print(json.dumps(result, indent=2, default=str)[:4000])
        return 0
    if len(argv) == 4 and argv[0] == "uninstall":
        release, namespace, kubeconfig = argv[1:4]
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
        result = await helm_sdkpy.Uninstall(config).run(release, wait=True, timeout=120)
        print(json.dumps(result, indent=2, default=str)[:4000])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
