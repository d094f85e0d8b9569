"""``helm template`` of charts/temper for the main value combinations, checked as parsed YAML."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.unit.test_chart_helm import (
    CHART,
    EVERYTHING_ON,
    MONITORING_APIS,
    ROOT,
    Manifest,
    by_kind,
    notes,
    one,
    render,
    render_error,
)

pytestmark = pytest.mark.unit

NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
ALL_OPERATOR_SETTINGS = {
    **NAMESPACED,
    "storage": {"endpoint": "http://minio.storage:9000", "credentialsSecret": "minio-creds"},
    "trainer": {"gpuResourceName": "amd.com/gpu", "image": {"pullPolicy": "Always"}},
    "operator": {"extraEnv": [{"name": "EXTRA", "value": "1"}]},
}
MONITORING_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom", "role": "alert-rules"}},
    }
}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
ALERTS = {
    "TemperRunFailed",
    "TemperStageStuck",
    "TemperGateFailed",
    "TemperAdapterVerificationFailed",
    "TemperOperatorDown",
}
# What the operator needs in every namespace it reconciles: (apiGroup, resource) -> verbs.
# docs/operator.md's RBAC table plus what the continual/adapter controllers call (child runs,
# alias ConfigMaps, finalizer patches); the cluster test proves these on a real apiserver.
OPERATOR_NAMESPACED_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    ("temper.dev", "posttrainingruns"): {"get", "list", "watch", "create", "delete"},
    ("temper.dev", "adapters"): {"get", "list", "watch", "patch", "create"},
    ("temper.dev", "posttrainingruns/status"): {"patch"},
    ("temper.dev", "adapters/status"): {"patch"},
    ("temper.dev", "posttrainingruns/finalizers"): {"update"},
    ("batch", "jobs"): {"list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("", "services"): {"list", "watch", "create"},
    ("networking.k8s.io", "networkpolicies"): {"create"},
    ("", "events"): {"create"},
    ("", "secrets"): {"get"},
    ("", "configmaps"): {"get", "list", "watch", "create", "update"},
}
CLUSTER_READS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list"}}
# Cluster-wide mode: Secrets and ConfigMap writes only through the tenant role, bound per served namespace.
TENANT_PERMISSIONS = {
    ("", "secrets"): {"get"},
    ("", "configmaps"): {"get", "list", "watch", "create", "update"},
}
CLUSTER_WIDE_PERMISSIONS = {
    **{k: v for k, v in OPERATOR_NAMESPACED_PERMISSIONS.items() if k not in TENANT_PERMISSIONS},
    ("", "configmaps"): {"get", "list", "watch"},
}


def permissions(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def subjects_are_operator_sa(binding: Manifest) -> None:
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-temper", "namespace": "temper-system"}
    ], binding["metadata"]["name"]


def operator_container(objs: list[Manifest]) -> dict[str, Any]:
    deployment = one(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def env_of(objs: list[Manifest]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in operator_container(objs)["env"]}


# --- Deployment ---------------------------------------------------------------------------


def test_defaults_render_the_expected_objects() -> None:
    kinds = sorted(o["kind"] for o in render())
    assert kinds == sorted(
        ["ServiceAccount", "ConfigMap", "Service", "Deployment"]
        + ["ClusterRole"] * 5  # operator, its tenant role, cluster-scoped reads, aggregated edit + view
        + ["ClusterRoleBinding"] * 2
        + ["Role", "RoleBinding"]  # leader-election Lease
        + ["NetworkPolicy"]  # the operator pod's
        + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 2  # runs, adapters
    )
    for obj in render():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_restricted_security_context() -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # A read-only root still needs a writable /tmp for Python.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["automountServiceAccountToken"] is True
    assert "hostNetwork" not in pod
    assert "hostPath" not in json.dumps(pod)


def test_uid_can_be_left_to_the_platform() -> None:
    values = {"securityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
    pod_sc = one(render(values), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_probes_ports_and_resources() -> None:
    container = operator_container(render())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8081, "metrics": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    requests = {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "64Mi"}
    assert container["resources"]["requests"] == requests
    assert container["resources"]["limits"] == {"memory": "512Mi", "ephemeral-storage": "256Mi"}
    service = one(render(), "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    changed = operator_container(render({"operator": {"healthPort": 8181, "metricsPort": 9191}}))
    assert {p["containerPort"] for p in changed["ports"]} == {8181, 9191}
    env = env_of(render({"operator": {"healthPort": 8181, "metricsPort": 9191}}))
    assert (env["TEMPER_HEALTH_PORT"], env["TEMPER_METRICS_PORT"]) == ("8181", "9191")


def test_images_default_to_app_version_and_digest_wins() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    container = operator_container(render())
    assert container["image"] == f"ghcr.io/temper/operator:{app_version}"
    assert env_of(render())["TEMPER_TRAINER_IMAGE"] == f"ghcr.io/temper/trainer:{app_version}"
    digest = "sha256:" + "ab" * 32
    values = {"image": {"tag": "9.9.9", "digest": digest}, "trainer": {"image": {"tag": "1.2.3"}}}
    assert operator_container(render(values))["image"] == f"ghcr.io/temper/operator@{digest}"
    assert env_of(render(values))["TEMPER_TRAINER_IMAGE"] == "ghcr.io/temper/trainer:1.2.3"


def test_operator_configuration_reaches_the_environment() -> None:
    env = env_of(render())
    assert env["TEMPER_NAMESPACES"] == ""
    assert env["TEMPER_GPU_RESOURCE"] == "nvidia.com/gpu"
    assert env["TEMPER_LEASE_NAME"] == "rel-temper-leader"
    assert env["TEMPER_LEASE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["TEMPER_IDENTITY"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Unset storage defaults leave the operator's own behaviour (AWS, ambient credentials).
    assert "TEMPER_DEFAULT_STORAGE_ENDPOINT" not in env
    assert "TEMPER_DEFAULT_STORAGE_SECRET" not in env
    env = env_of(render(ALL_OPERATOR_SETTINGS))
    assert env["TEMPER_NAMESPACES"] == "team-a,team-b"
    assert env["TEMPER_DEFAULT_STORAGE_ENDPOINT"] == "http://minio.storage:9000"
    assert env["TEMPER_DEFAULT_STORAGE_SECRET"] == "minio-creds"
    assert env["TEMPER_GPU_RESOURCE"] == "amd.com/gpu"
    assert env["TEMPER_IMAGE_PULL_POLICY"] == "Always"
    assert env["EXTRA"] == "1"


def test_every_variable_the_chart_sets_is_read_by_the_operator() -> None:
    # A value whose variable nobody reads would silently do nothing.
    sources = "\n".join(p.read_text() for p in (ROOT / "operator" / "temper").rglob("*.py"))
    chart_vars = {name for name in env_of(render(ALL_OPERATOR_SETTINGS)) if name.startswith("TEMPER_")}
    assert len(chart_vars) >= 12
    unread = sorted(v for v in chart_vars if f'"{v}"' not in sources)
    assert not unread, f"the chart sets variables operator/temper never reads: {unread}"


def test_trainer_final_scrape_wait_follows_the_pod_monitor_unless_set() -> None:
    from temper.config import OperatorConfig

    def wait(values: dict[str, Any], api_versions: tuple[str, ...] = ()) -> int:
        env = env_of(render(values, api_versions=api_versions))
        return OperatorConfig.from_env(env).trainer_metrics_final_scrape_seconds

    assert wait({}) == 0  # nobody scrapes the pods: they exit at once
    pod_monitor = {"metrics": {"podMonitor": {"enabled": True}}}
    api = ("monitoring.coreos.com/v1/PodMonitor",)
    assert wait(pod_monitor, api) == 30  # two of its default 15 s intervals
    assert wait({"trainer": {"metricsFinalScrapeSeconds": 5}}) == 5  # a Prometheus of your own
    assert wait({**pod_monitor, "trainer": {"metricsFinalScrapeSeconds": 0}}, api) == 0
    assert "metricsFinalScrapeSeconds" in render_error({"trainer": {"metricsFinalScrapeSeconds": -1}})


def test_chart_defaults_match_the_operator_defaults() -> None:
    from temper.config import OperatorConfig

    defaults = OperatorConfig()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["healthPort"] == defaults.health_port
    assert values["operator"]["metricsPort"] == defaults.metrics_port
    assert values["trainer"]["metricsPort"] == defaults.trainer_metrics_port
    assert values["trainer"]["gpuResourceName"] == defaults.gpu_resource
    assert values["operator"]["leaderElection"]["leaseDurationSeconds"] == defaults.lease_duration_seconds
    # What the chart renders is what the operator parses.
    env = {k: v for k, v in env_of(render(ALL_OPERATOR_SETTINGS)).items() if isinstance(v, str)}
    parsed = OperatorConfig.from_env(env)
    assert parsed.namespaces == ("team-a", "team-b")
    assert parsed.health_port == 8081
    assert parsed.gpu_resource == "amd.com/gpu"
    assert parsed.lease_name == "rel-temper-leader"
    assert parsed.trainer_image.startswith("ghcr.io/temper/trainer:")
    # Without the chart the operator falls back to the same trainer repository.
    assert defaults.trainer_image.rsplit(":", 1)[0] == values["trainer"]["image"]["repository"]


def test_scheduling_and_pod_metadata_pass_through() -> None:
    values = {
        "nodeSelector": {"node-role.kubernetes.io/infra": ""},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
        },
        "podAnnotations": {"example.com/team": "ml-platform"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "imagePullSecrets": [{"name": "ghcr"}],
    }
    template = one(render(values), "Deployment")["spec"]["template"]
    pod = template["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]
    assert template["metadata"]["annotations"] == {"example.com/team": "ml-platform"}
    assert template["metadata"]["labels"]["team"] == "ml"
    default_pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"} & set(
        default_pod
    )


def test_strategy_follows_lease_leadership() -> None:
    spec = one(render(), "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    recreate = one(render({"strategy": {"type": "Recreate"}}), "Deployment")["spec"]["strategy"]
    assert recreate == {"type": "Recreate"}  # rollingUpdate with Recreate is rejected by the API
    objs = render(EVERYTHING_ON)
    assert one(objs, "Deployment")["spec"]["replicas"] == 2
    pdb = one(objs, "PodDisruptionBudget")
    assert (
        pdb["spec"]["selector"]["matchLabels"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_existing_service_account() -> None:
    objs = render({"serviceAccount": {"create": False, "name": "platform-sa"}})
    assert not by_kind(objs, "ServiceAccount")
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    for binding in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
        assert binding["subjects"][0]["name"] == "platform-sa"


# --- RBAC ---------------------------------------------------------------------------------


def test_cluster_wide_rbac() -> None:
    objs = render()
    operator_role = one(objs, "ClusterRole", "rel-temper")
    assert permissions(operator_role["rules"]) == CLUSTER_WIDE_PERMISSIONS  # no Secrets, no ConfigMap writes
    tenant = one(objs, "ClusterRole", "rel-temper-tenant")
    assert permissions(tenant["rules"]) == TENANT_PERMISSIONS
    assert not [b for b in by_kind(objs, "RoleBinding") if b["roleRef"]["name"] == "rel-temper-tenant"]
    cluster_reads = one(objs, "ClusterRole", "rel-temper-cluster")
    assert permissions(cluster_reads["rules"]) == CLUSTER_READS
    for name in ("rel-temper", "rel-temper-cluster"):
        binding = one(objs, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        subjects_are_operator_sa(binding)
    # Only the leader-election Role is namespaced in this mode.
    assert [r["metadata"]["name"] for r in by_kind(objs, "Role")] == ["rel-temper-leader-election"]


def test_cluster_wide_mode_binds_the_tenant_role_only_in_served_namespaces() -> None:
    objs = render({"rbac": {"servedNamespaces": ["team-b", "team-a"]}})
    bindings = [b for b in by_kind(objs, "RoleBinding") if b["roleRef"]["name"] == "rel-temper-tenant"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "ClusterRole"
        subjects_are_operator_sa(binding)
    # Namespaced mode ignores the list: each Role carries everything already.
    namespaced = render({**NAMESPACED, "rbac": {"servedNamespaces": ["kube-system"]}})
    assert not [o for o in namespaced if o["metadata"].get("namespace") == "kube-system"]


def test_namespaced_rbac() -> None:
    objs = render(NAMESPACED)
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(objs, "Role")}
    assert set(roles) == {
        ("team-a", "rel-temper"),
        ("team-b", "rel-temper"),
        ("temper-system", "rel-temper-leader-election"),
    }
    for ns in ("team-a", "team-b"):
        assert permissions(roles[(ns, "rel-temper")]["rules"]) == OPERATOR_NAMESPACED_PERMISSIONS
        binding = one(
            [b for b in by_kind(objs, "RoleBinding") if b["metadata"]["namespace"] == ns], "RoleBinding"
        )
        assert binding["roleRef"]["kind"] == "Role"
        subjects_are_operator_sa(binding)
    # No cluster-wide grant of namespaced resources.
    assert not [r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"] == "rel-temper"]
    cluster_reads = one(objs, "ClusterRole", "rel-temper-cluster")
    assert permissions(cluster_reads["rules"]) == CLUSTER_READS
    assert [b["metadata"]["name"] for b in by_kind(objs, "ClusterRoleBinding")] == ["rel-temper-cluster"]


def test_everything_docs_operator_md_asks_for_is_granted() -> None:
    text = (ROOT / "docs" / "operator.md").read_text().split("## RBAC", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`([^`]*)`\s*\|\s*`([^`]+)`\s*\|\s*([a-z, ]+?)\s*\|", text, re.M)
    assert len(rows) >= 10
    objs = render()
    granted = permissions(one(objs, "ClusterRole", "rel-temper")["rules"])
    for rules_of in ("rel-temper-cluster", "rel-temper-leader-election", "rel-temper-tenant"):
        kind = "Role" if rules_of.endswith("leader-election") else "ClusterRole"
        granted.update(permissions(one(objs, kind, rules_of)["rules"]))
    for raw_group, resource, verbs in rows:
        group = "" if raw_group == '""' else raw_group
        wanted = {v.strip() for v in verbs.split(",")}
        assert wanted <= granted.get((group, resource), set()), f"{group}/{resource}: {wanted}"


def test_leader_election_rbac_is_one_lease_in_the_release_namespace() -> None:
    for values in (None, NAMESPACED):
        objs = render(values)
        role = one(objs, "Role", "rel-temper-leader-election")
        assert role["metadata"]["namespace"] == "temper-system"
        assert permissions(role["rules"]) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
        subjects_are_operator_sa(one(objs, "RoleBinding", "rel-temper-leader-election"))


def all_rules(objs: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", rule)
        for o in objs
        if o["kind"] in ("Role", "ClusterRole")
        for rule in o["rules"]
    ]


@pytest.mark.parametrize(
    "values", [None, NAMESPACED, EVERYTHING_ON, {"rbac": {"aggregateToDefaultRoles": False}}], ids=str
)
def test_no_wildcards_or_escalation_anywhere(values: dict[str, Any] | None) -> None:
    rules = all_rules(render(values, api_versions=MONITORING_APIS))
    assert rules
    for where, rule in rules:
        for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
            assert not any("*" in item for item in rule.get(field, [])), (
                f"{where}: wildcard in {field}: {rule}"
            )
        assert not {"bind", "escalate", "impersonate"} & set(rule["verbs"]), where
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], f"{where}: secrets may only be read one by one: {rule}"


def test_aggregated_user_roles() -> None:
    objs = render()
    edit = one(objs, "ClusterRole", "rel-temper-edit")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    view = one(objs, "ClusterRole", "rel-temper-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert all(v in {"get", "list", "watch"} for rule in view["rules"] for v in rule["verbs"])
    names = {o["metadata"]["name"] for o in render({"rbac": {"aggregateToDefaultRoles": False}})}
    assert not {"rel-temper-edit", "rel-temper-view"} & names
    assert not by_kind(render({"rbac": {"create": False}}), "ClusterRole")


# --- Monitoring ---------------------------------------------------------------------------


def test_monitoring_needs_both_the_flag_and_the_api() -> None:
    assert not MONITORING_KINDS & {o["kind"] for o in render(api_versions=MONITORING_APIS)}
    assert not MONITORING_KINDS & {o["kind"] for o in render(MONITORING_ON)}
    warning = "they were NOT created"
    assert warning in notes(MONITORING_ON)
    objs = render(MONITORING_ON, api_versions=MONITORING_APIS)
    assert {o["kind"] for o in objs} >= MONITORING_KINDS
    assert warning not in notes(MONITORING_ON, api_versions=MONITORING_APIS)
    for kind in MONITORING_KINDS:
        assert one(objs, kind)["metadata"]["labels"]["release"] == "prom", kind
    assert one(objs, "PrometheusRule")["metadata"]["labels"]["role"] == "alert-rules"
    # Each object is guarded by its own API: only ServiceMonitor available -> only it renders.
    partial = render(MONITORING_ON, api_versions=("monitoring.coreos.com/v1/ServiceMonitor",))
    assert MONITORING_KINDS & {o["kind"] for o in partial} == {"ServiceMonitor"}


def test_service_monitor_targets_the_operator_metrics_service() -> None:
    objs = render(MONITORING_ON, api_versions=MONITORING_APIS)
    monitor = one(objs, "ServiceMonitor")
    service = one(objs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["temper-system"]}


def test_pod_monitor_follows_the_watch_mode() -> None:
    cluster_wide = one(render(MONITORING_ON, api_versions=MONITORING_APIS), "PodMonitor")["spec"]
    assert cluster_wide["namespaceSelector"] == {"any": True}
    assert cluster_wide["selector"] == {"matchExpressions": [{"key": "temper.dev/run", "operator": "Exists"}]}
    assert cluster_wide["podMetricsEndpoints"][0]["port"] == "metrics"
    # The selector and relabelings follow the labels the operator puts on trainer pods.
    from temper.builders.names import LABEL_RUN, LABEL_STAGE

    assert cluster_wide["selector"]["matchExpressions"][0]["key"] == LABEL_RUN
    relabel_sources = [r["sourceLabels"][0] for r in cluster_wide["podMetricsEndpoints"][0]["relabelings"]]
    assert relabel_sources == [
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)
        for label in (LABEL_RUN, LABEL_STAGE)
    ]
    namespaced = one(render({**MONITORING_ON, **NAMESPACED}, api_versions=MONITORING_APIS), "PodMonitor")[
        "spec"
    ]
    assert namespaced["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def alert_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    rule = one(render(values, api_versions=MONITORING_APIS), "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def runbook_anchors() -> set[str]:
    # GitHub's anchor of "## TemperRunFailed" is "#temperrunfailed".
    text = (ROOT / "docs" / "runbooks.md").read_text()
    return {
        re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-"))
        for h in re.findall(r"^#+ (.+)$", text, re.M)
    }


def test_alerts_each_link_to_a_runbook_section() -> None:
    rules = alert_rules(MONITORING_ON)
    assert {r["alert"] for r in rules} == ALERTS
    anchors = runbook_anchors()
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/temper/temper/blob/main/docs/runbooks.md#")
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no runbook section for {url}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_alerts_are_configurable() -> None:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "disabledAlerts": ["TemperGateFailed"],
                "stageStuckFor": "2h",
                "runbookBaseUrl": "https://wiki.example.com/temper/",
            }
        }
    }
    rules = {r["alert"]: r for r in alert_rules(values)}
    assert set(rules) == ALERTS - {"TemperGateFailed"}
    assert "[2h]" in rules["TemperStageStuck"]["expr"]
    assert "offset 2h" in rules["TemperStageStuck"]["expr"]
    assert rules["TemperOperatorDown"]["annotations"]["runbook_url"] == (
        "https://wiki.example.com/temper#temperoperatordown"
    )
    # The operator-down alert must name the job the ServiceMonitor produces (the Service's name).
    assert 'job="rel-temper-metrics"' in rules["TemperOperatorDown"]["expr"]
    assert one(render(), "Service")["metadata"]["name"] == "rel-temper-metrics"


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\|\s*`(temper_[a-z_]+)`", text, re.M))


def referenced_metrics(promql: str) -> set[str]:
    names = set(re.findall(r"\btemper_[a-z_]+", promql))
    # Histograms are queried through their _bucket/_sum/_count series.
    return {
        re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n
        for n in names
    }


def test_every_exported_metric_is_documented() -> None:
    # Names as the code declares them; counters are declared with their _total suffix.
    declared = set()
    for module in (
        ROOT / "operator" / "temper" / "metrics.py",
        ROOT / "trainer_image" / "temper_trainer" / "metrics.py",
    ):
        declared |= set(re.findall(r'"(temper_[a-z_]+)"', module.read_text()))
    assert {"temper_runs", "temper_trainer_loss"} <= declared
    assert declared == documented_metrics()


def test_operator_metric_types_and_labels_are_documented() -> None:
    import temper.metrics as operator_metrics
    from prometheus_client.metrics import MetricWrapperBase

    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if match := re.match(r"^\|\s*`(temper_[a-z_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line):
            rows[match.group(1)] = (match.group(2), set(re.findall(r"`(\w+)`", match.group(3))))
    metrics = [m for m in vars(operator_metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(metrics) >= 15
    for metric in metrics:
        name = metric._name + ("_total" if metric._type == "counter" else "")
        assert rows[name] == (metric._type, set(metric._labelnames)), name


def test_alerts_only_use_documented_metrics() -> None:
    documented = documented_metrics()
    assert len(documented) >= 20
    for rule in alert_rules(MONITORING_ON):
        used = referenced_metrics(rule["expr"])
        assert used - documented == set(), rule["alert"]


# --- Grafana dashboard --------------------------------------------------------------------


def dashboard(values: dict[str, Any] | None = None) -> tuple[Manifest, dict[str, Any]]:
    configmap = one(render(values), "ConfigMap", "rel-temper-dashboard")
    return configmap, json.loads(configmap["data"]["temper.json"])


def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    configmap, board = dashboard()
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "temper-system"
    assert board["uid"] == "temper-overview"
    relocated, _ = dashboard(
        {"metrics": {"dashboard": {"namespace": "grafana", "annotations": {"grafana_folder": "ML"}}}}
    )
    assert relocated["metadata"]["namespace"] == "grafana"
    assert relocated["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert not [o for o in render({"metrics": {"dashboard": {"enabled": False}}}) if o["kind"] == "ConfigMap"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    _, board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    needed = {
        "runs by state": "temper_runs",
        "stage durations": "temper_stage_duration_seconds_bucket",
        "live loss": "temper_run_loss",
        "live progress": "temper_run_progress_ratio",
        "forgetting per suite": "temper_forgetting_ratio",
        "drift per stage": "temper_stage_drift_kl",
        "adapters by lifecycle": "temper_adapters",
    }
    for what, metric in needed.items():
        assert any(re.search(rf"\b{metric}\b", e) for e in exprs.values()), f"no panel shows {what}"
    documented = documented_metrics()
    for title, expr in exprs.items():
        assert referenced_metrics(expr) - documented == set(), title
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    # Every panel queries the chosen data source, never a hard-coded one.
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)


def test_dashboard_panels_do_not_overlap() -> None:
    _, board = dashboard()
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area


def test_notes_explain_the_next_steps() -> None:
    text = notes()
    assert "cluster-wide" in text
    assert "kubectl wait --for=condition=Succeeded" in text
    assert "docs/upgrading.md" in text
    assert "watching: team-a, team-b" in notes(NAMESPACED)


def test_chart_crds_are_the_generated_ones() -> None:
    # Helm installs charts/temper/crds; it must be byte-identical to the generated crds/.
    chart_crds = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    generated = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert chart_crds, "charts/temper/crds is empty: run `make crds`"
    assert chart_crds == generated
    kinds = {yaml.safe_load(text)["spec"]["names"]["kind"] for text in chart_crds.values()}
    assert kinds == {"PostTrainingRun", "Adapter"}


def test_chart_files_are_all_used() -> None:
    # Catches a template or dashboard left behind after a rename.
    rendered = "\n".join(json.dumps(o) for o in render(EVERYTHING_ON, api_versions=MONITORING_APIS))
    for template in (CHART / "templates").glob("*.yaml"):
        assert f"templates/{template.name}" in _sources(EVERYTHING_ON), template.name
    assert "temper-overview" in rendered


def _sources(values: dict[str, Any]) -> set[str]:
    from tests.unit.test_chart_helm import KUBE_VERSION, run_helm

    args = ["template", "rel", str(CHART), "--kube-version", KUBE_VERSION]
    for api in MONITORING_APIS:
        args += ["--api-versions", api]
    out = run_helm(*args, values=values).stdout
    return {m.split("temper/", 1)[1] for m in re.findall(r"^# Source: (\S+)", out, re.M)}
