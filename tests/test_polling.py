"""An agent follows its own held action with the official SDK: the 202's note, poll, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY

RULES = Path(__file__).parent / "data" / "rules_core"
OTHER_KEY = "sk_test_anotheragent00000000000000001234"


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Iterator[GatewayThread]:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gateway:
        yield gateway


def agent(gw: GatewayThread, key: str = TEST_STRIPE_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": gw.url}, max_network_retries=0)


def poll(client: stripe.StripeClient, action_id: str, verb: str = "") -> Any:
    method = "post" if verb else "get"
    resp = client.raw_request(method, f"/cosigner/v1/actions/{action_id}{verb}")
    return client.deserialize(resp, api_mode="V1")


def test_the_202_tells_the_agent_how_to_poll_and_polling_works(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=8000)
    client = agent(gw)
    held = client.v1.refunds.create(params={"charge": charge["id"], "amount": 3000})
    assert held.last_response.code == 202
    assert held.last_response.headers["Cosigner-Action"] == held["id"]
    assert "Stripe-Should-Retry" not in held.last_response.headers
    message = held["message"]
    assert f"Poll GET /cosigner/v1/actions/{held['id']}" in message
    assert "same API key" in message and "Idempotency-Key" in message
    assert "Cosigner-Wait" in message

    polled = poll(client, held["id"])
    assert polled["object"] == "cosigner.action" and polled["status"] == "awaiting_approval"
    assert polled["agent"] == "sk_test_…6789" and polled["decisions"] == []

    gw.admin("POST", f"/cosigner/v1/actions/{held['id']}/approve", json={"reviewer": "ops@x.io"})
    gw.wait_status(held["id"], {"completed"})
    done = poll(client, held["id"])
    assert done["status"] == "completed" and done["response_code"] == 200
    assert done["response_body"]["object"] == "refund"
    assert done["response_body"]["amount"] == 3000


def test_agents_poll_and_cancel_only_their_own_actions(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge()
    mine = agent(gw)
    other = agent(gw, OTHER_KEY)
    held = mine.v1.refunds.create(
        params={"charge": charge["id"], "amount": 1200}, options={"idempotency_key": "poll-own"}
    )
    with pytest.raises(stripe.InvalidRequestError) as err:
        poll(other, held["id"])
    assert err.value.http_status == 404 and err.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError):
        poll(other, held["id"], "/cancel")
    with pytest.raises(stripe.AuthenticationError):
        poll(agent(gw, ""), held["id"])
    assert poll(mine, held["id"])["status"] == "awaiting_approval"

    cancelled = poll(mine, held["id"], "/cancel")
    assert cancelled["status"] == "cancelled"
    with pytest.raises(stripe.APIError) as again:  # the SDK's class for a 409
        poll(mine, held["id"], "/cancel")
    assert again.value.http_status == 409
    assert again.value.json_body["error"]["code"] == "action_not_awaiting_approval"
    # Re-sending the same request now answers with the outcome, waiting or not.
    with pytest.raises(stripe.PermissionError) as closed:
        mine.v1.refunds.create(
            params={"charge": charge["id"], "amount": 1200},
            options={"idempotency_key": "poll-own", "headers": {"Cosigner-Wait": "5"}},
        )
    assert closed.value.json_body["error"]["code"] == "cosigner_cancelled"
