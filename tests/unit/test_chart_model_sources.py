"""Chart values for where models come from: the Hub endpoint and the model-cache volume reach
the operator's environment, parse back to the same settings, and bad combinations are refused."""

from __future__ import annotations

import pytest
import yaml
from temper.api.common import ModelCache
from temper.config import OperatorConfig

from tests.unit.test_chart_helm import CHART, render, render_error
from tests.unit.test_chart_render import env_of

pytestmark = pytest.mark.unit


def _parsed(values: dict[str, object] | None = None) -> OperatorConfig:
    env = {k: v for k, v in env_of(render(values)).items() if isinstance(v, str)}
    return OperatorConfig.from_env(env)


def test_defaults_match_the_operator_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]
    defaults = OperatorConfig()
    assert values["modelCache"]["path"] == defaults.model_cache_path
    assert values["modelCache"]["type"] == defaults.model_cache.type
    parsed = _parsed()
    assert parsed.hf_endpoint is None
    assert parsed.model_cache == ModelCache()
    assert "TEMPER_HF_ENDPOINT" not in env_of(render())


def test_hub_endpoint_and_a_shared_cache_claim_reach_the_operator() -> None:
    parsed = _parsed(
        {
            "trainer": {
                "hubEndpoint": "https://hub-mirror.internal",
                "modelCache": {"type": "pvc", "claimName": "models", "path": "/models"},
            }
        }
    )
    assert parsed.hf_endpoint == "https://hub-mirror.internal"
    assert parsed.model_cache == ModelCache(type="pvc", claim_name="models")
    assert parsed.model_cache_path == "/models"
    ephemeral = _parsed(
        {"trainer": {"modelCache": {"type": "ephemeral", "size": "200Gi", "storageClassName": "nvme"}}}
    )
    assert ephemeral.model_cache == ModelCache(type="ephemeral", size="200Gi", storage_class_name="nvme")


@pytest.mark.parametrize(
    ("cache", "mention"),
    [
        ({"type": "ephemeral"}, "size"),
        ({"type": "pvc"}, "claimName"),
        ({"type": "hostPath"}, "type"),
        ({"size": "lots"}, "size"),
    ],
)
def test_bad_model_cache_values_are_refused(cache: dict[str, str], mention: str) -> None:
    assert mention in render_error({"trainer": {"modelCache": cache}})


def test_bad_hub_endpoint_is_refused() -> None:
    assert "hubEndpoint" in render_error({"trainer": {"hubEndpoint": "hub-mirror:8090"}})
