"""Property-based tests of the whole API from its own OpenAPI document (Schemathesis): whatever
valid or invalid request it generates, the server never answers 5xx, and every response matches
the documented schema. Against a real uvicorn server, Postgres and Redis.

Schemathesis's pytest plugin does not work with pytest 9 yet, so each operation's Hypothesis
strategy is driven directly (the same checks, without the plugin).

One default check is left out: `positive_data_acceptance` expects every schema-valid request to
succeed, but a model or dataset name is valid by schema and still has to be registered (422).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.integration.conftest import Live

EXAMPLES = 12  # per operation; ~20 operations


def test_no_server_errors_and_documented_responses(live: Live) -> None:
    headers = {"Authorization": f"Bearer {live.secret}"}
    schema = schemathesis.openapi.from_url(f"{live.base}/api/v1/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(
                base_url=live.base, headers=headers, excluded_checks=[positive_data_acceptance]
            )

        check()
