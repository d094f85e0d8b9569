"""In a pod the operator reaches the apiserver the way client-go does: KUBERNETES_SERVICE_HOST/PORT."""

from __future__ import annotations

import kopf
import pytest
from temper import kube

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("host", "server"), [("10.96.0.1", "https://10.96.0.1:6443"), ("fd00::1", "https://[fd00::1]:6443")]
)
def test_in_cluster_login_uses_the_kubelet_env(
    monkeypatch: pytest.MonkeyPatch, host: str, server: str
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    token = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="t", default_namespace="ns")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: token)
    info = kube.connection_info()
    assert info.server == server
    assert (info.token, info.default_namespace) == ("t", "ns")
