"""schemathesis against `/openapi.json`: generated valid and invalid requests to every route,
every check (no 5xx, responses match the documented status codes, content types and bodies,
invalid input refused; valid input accepted or refused only with a documented 400). In-process over the small test engine, so the cases run in
milliseconds each; `DFASTLLM_SCHEMA_EXAMPLES` raises the count per operation (40 by default,
~500 cases; 100 gives the ~1,100-case run quoted in docs/serving.md).
"""
from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from serve_fakes import FakeEngine, fake_card  # noqa: E402

from dfastllm_ray.serve.api import build_api  # noqa: E402
from dfastllm_ray.serve.clients import LocalClient  # noqa: E402
from dfastllm_ray.serve.config import ModelConfig, ServerSettings  # noqa: E402
from dfastllm_ray.serve.guards import ApiKeys  # noqa: E402
from dfastllm_ray.serve.replica import ReplicaCore  # noqa: E402
from dfastllm_ray.serve.server import OpenAIServer  # noqa: E402

EXAMPLES = int(os.environ.get("DFASTLLM_SCHEMA_EXAMPLES", "40"))


def _app():
    core = ReplicaCore(ModelConfig(model_id="fake"), FakeEngine(), fake_card())
    server = OpenAIServer(ServerSettings(api_keys_env=None), {"fake": LocalClient(core)})
    return build_api(server, ApiKeys([]))


# Schema-valid requests may still be refused with 400 for bounds a JSON schema cannot state:
# relations between fields and the model (prompt + max_tokens within the context, steps <= the
# generated positions, prompt xor messages on /tokenize). Every other check runs as is.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "429", "503"]}}})
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(), config=CONFIG)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_schema(case):
    case.call_and_validate()
