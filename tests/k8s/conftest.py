"""What the manifest tests share: kustomize (stack/k8s.sh installs it once from the Go
module proxy), each overlay rendered once per session, and the environment a rendered pod
gives its container.
"""

from __future__ import annotations

import base64
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod", "test")
# Values the downward API gives a pod of the StatefulSet: metadata.name is its stable name.
POD_FIELDS = {"metadata.name": "tm-0", "metadata.namespace": "tm", "status.podIP": "10.0.0.10"}

Obj = dict[str, Any]


def _script(*args: str) -> list[str]:
    done = subprocess.run(
        ["bash", str(ROOT / "stack" / "k8s.sh"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"stack/k8s.sh {' '.join(args)} failed:\n{done.stderr}", pytrace=False)
    return done.stdout.split()


@pytest.fixture(scope="session")
def kustomize() -> str:
    return _script()[-1]


@pytest.fixture(scope="session")
def crd_modules() -> list[Path]:
    """The module directories of KEDA and prometheus-operator, which ship their CRDs."""
    return [Path(line) for line in _script("crds")]


def build(kustomize: str, overlay: str) -> list[Obj]:
    done = subprocess.run(
        [kustomize, "build", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kustomize build k8s/overlays/{overlay}:\n{done.stderr}"
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@pytest.fixture(scope="session")
def rendered(kustomize: str) -> dict[str, list[Obj]]:
    return {overlay: build(kustomize, overlay) for overlay in OVERLAYS}


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return found[0]


def tm_config(objects: list[Obj]) -> Obj:
    """tm's settings ConfigMap (named with kustomize's hash), not the dashboard's."""
    (found,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("tm-config")
    ]
    return found


def secret_data(secret: Obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def container_env(objects: list[Obj], pod_spec: Obj, container: Obj) -> dict[str, str]:
    """The environment the kubelet gives ``container``: envFrom sources in order (a later one
    wins), then ``env`` (which wins over envFrom). Downward-API values get POD_FIELDS; a
    resourceFieldRef gets the container's value in units of its divisor, rounded up."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        elif "secretRef" in source:
            env.update(secret_data(one(objects, "Secret", source["secretRef"]["name"])))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z0-9_]+)\)", lambda m: env[m[1]], var["value"])
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[var["name"]] = POD_FIELDS[ref["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = one(objects, "ConfigMap", key["name"])["data"][key["key"]]
        elif "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            env[var["name"]] = secret_data(one(objects, "Secret", key["name"]))[key["key"]]
        elif "resourceFieldRef" in ref:
            field = ref["resourceFieldRef"]
            kind, resource = field["resource"].split(".")
            value = quantity(container["resources"][kind][resource])
            env[var["name"]] = str(math.ceil(value / quantity(field.get("divisor", "1"))))
        else:
            raise AssertionError(f"unknown valueFrom in {var}")
    return env


_SUFFIXES = {"m": 0.001, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2", "384Mi") as a number (cores, bytes)."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match[1]) * _SUFFIXES[match[2]]
