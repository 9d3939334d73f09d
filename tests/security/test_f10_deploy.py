"""Finding 10: deploy/ ships no default password, keeps Redis, PostgreSQL and Flower off the network,
and runs every pod unprivileged, limited, with only the Secrets it needs.

The Kubernetes manifests are rendered for real with ``kubectl kustomize``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import need

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRETS = ("redis", "postgres", "broker", "database", "provider-keys", "flower")


def test_f10_compose_requires_every_password_and_publishes_only_flower_on_loopback() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert "change-me" not in text and ":-dmipro" not in text
    for var in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"):
        uses = re.findall(r"\$\{" + var + r"(:[?-][^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (var, uses)
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert "--requirepass" in " ".join(services["redis"]["command"])
    assert "redis://:${REDIS_PASSWORD:?" in compose["x-dmipro-env"]["DMIPRO_BROKER_URL"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert published == {"flower": ["127.0.0.1:5555:5555"]}
    assert compose["networks"]["backend"]["internal"] is True
    assert services["redis"]["networks"] == ["backend"] and services["postgres"]["networks"] == ["backend"]
    flower_env = services["flower"]["environment"]
    assert "DMIPRO_DATABASE_URL" not in flower_env and not any("API_KEY" in k for k in flower_env)
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"] or compose["x-hardened"]["cap_drop"] == ["ALL"], name
        assert "mem_limit" in service or "mem_limit" in compose["x-dmipro"], name


def _render(tmp_path: Path, missing: str | None = None) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        need("kubectl (for kubectl kustomize) is not installed")
    copy = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", copy)
    for name in SECRETS:
        if name != missing:
            (copy / "secrets" / f"{name}.env").write_text(f"PLACEHOLDER_{name.upper().replace('-', '_')}=x\n")
    return subprocess.run([str(kubectl), "kustomize", str(copy)], capture_output=True, text=True, timeout=120)


def test_f10_k8s_renders_only_with_every_secret_and_hardens_every_pod(tmp_path: Path) -> None:
    refused = _render(tmp_path / "a", missing="redis")
    assert refused.returncode != 0 and "redis.env" in refused.stderr
    rendered = _render(tmp_path / "b")
    assert rendered.returncode == 0, rendered.stderr
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert "change-me" not in rendered.stdout
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert secrets == {f"dmipro-{n}" for n in SECRETS}

    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}
    assert set(pods) == {"redis", "postgres", "dmipro-coordinator", "dmipro-work", "flower"}
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], name
            limits = container["resources"]["limits"]
            assert "memory" in limits and "cpu" in limits, name

    def secrets_of(pod: dict[str, Any]) -> set[str]:
        out = set()
        for c in pod["containers"]:
            out |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
            out |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})}
        return out

    assert secrets_of(pods["flower"]) == {"dmipro-broker", "dmipro-flower"}
    assert secrets_of(pods["redis"]) == {"dmipro-redis"}
    assert secrets_of(pods["postgres"]) == {"dmipro-postgres"}
    assert secrets_of(pods["dmipro-work"]) == {"dmipro-broker", "dmipro-database", "dmipro-provider-keys"}

    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"]["podSelector"] == {}
    def sources(policy: str) -> set[str]:
        return {p["podSelector"]["matchLabels"]["app"] for p in policies[policy]["ingress"][0]["from"]}

    redis_from = sources("redis-from-dmipro")
    assert redis_from == {"dmipro-coordinator", "dmipro-work", "flower"}
    pg_from = sources("postgres-from-workers")
    assert pg_from == {"dmipro-coordinator", "dmipro-work"}


@pytest.mark.parametrize("script", ["local-stack.sh"])
def test_f10_the_local_stack_starts_redis_with_a_password(script: str) -> None:
    text = (DEPLOY / script).read_text()
    assert "requirepass" in text and "redis://:$REDIS_PASSWORD@127.0.0.1" in text
