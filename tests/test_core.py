"""The core loop end to end: the official stripe SDK as the agent, localstripe as Stripe."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from gateway.keys import STORE
from tests.support.gateway import ADMIN_TOKEN, GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY

RULES = Path(__file__).parent / "data" / "rules_core"
OTHER_KEY = "sk_test_someoneelse000000000000004321"


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Any:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gateway:
        yield gateway


def agent(gw: GatewayThread, key: str = TEST_STRIPE_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": gw.url}, max_network_retries=0)


def raw(
    gw: GatewayThread, method: str, path: str, key: str | None = TEST_STRIPE_KEY, **kwargs: Any
) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.request(method, gw.url + path, headers=headers, timeout=30, **kwargs)


def hold_refund(gw: GatewayThread, charge: str, amount: int = 2500, **extra: Any) -> Any:
    resp = raw(
        gw,
        "POST",
        "/v1/refunds",
        data={"charge": charge, "amount": str(amount), **extra},
        headers=extra.pop("headers", {}),
    )
    assert resp.status_code == 202, resp.text
    return resp


def approve(
    gw: GatewayThread, action_id: str, reviewer: str = "ops@example.com", **body: Any
) -> requests.Response:
    return gw.admin(
        "POST", f"/cosigner/v1/actions/{action_id}/approve", json={"reviewer": reviewer, **body}
    )


def refunds_for(upstream: Any, charge: str) -> list[dict[str, Any]]:
    return [r for r in upstream.refunds(charge) if r["charge"] == charge]


# -- reads, denies, authentication --------------------------------------------------------


def test_reads_pass_through_with_stripes_answer(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=4200)
    fetched = agent(gw).v1.charges.retrieve(charge["id"])
    assert fetched.id == charge["id"] and fetched.amount == 4200
    resp = raw(gw, "GET", f"/v1/charges/{charge['id']}")
    assert resp.status_code == 200
    assert resp.headers["Cosigner-Request-Id"].startswith("req_")
    missing = raw(gw, "GET", "/v1/charges/ch_doesnotexist")
    assert missing.status_code == 404 and "error" in missing.json()


def test_request_without_key_gets_401_and_is_never_held(gw: GatewayThread, upstream: Any) -> None:
    resp = raw(gw, "POST", "/v1/refunds", key=None, data={"charge": "ch_x", "amount": "10"})
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    with pytest.raises(stripe.AuthenticationError):
        stripe.StripeClient("", base_addresses={"api": gw.url}).v1.charges.list()
    listed = gw.admin("GET", "/cosigner/v1/actions").json()
    assert listed["data"] == []


def test_deny_is_403_in_stripes_shape(gw: GatewayThread, upstream: Any) -> None:
    with pytest.raises(stripe.PermissionError) as err:
        agent(gw).v1.customers.delete("cus_123")
    body = err.value.json_body
    assert body["error"]["code"] == "cosigner_denied"
    assert body["error"]["rule"] == "no-customer-deletes"
    assert body["error"]["message"] == "Agents may not delete customers."
    assert not [r for r in upstream.requests() if r["method"] == "DELETE"]


# -- hold, approve, forward once -----------------------------------------------------------


def test_refund_held_then_approved_reaches_stripe_exactly_once(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=10_000)
    held = (
        agent(gw)
        .v1.refunds.create(
            params={"charge": charge["id"], "amount": 4999},
            options={"idempotency_key": "idem-approve-1"},
        )
        .to_dict()
    )
    assert held["object"] == "cosigner.action"
    assert held["status"] == "awaiting_approval"
    assert held["rule"] == "refunds"
    assert held["params"] == {"charge": charge["id"], "amount": "4999"}
    assert held["summary"].startswith("Refund")
    assert held["approvals_required"] == 1
    assert held["expires_at"] - held["created"] == 86400
    assert held["receipt_url"] == f"{gw.url}/dashboard/actions/{held['id']}"
    assert held["message"].startswith(
        f"Held for human approval. Poll GET /cosigner/v1/actions/{held['id']}"
    )
    assert refunds_for(upstream, charge["id"]) == []

    resp = approve(gw, held["id"], note="looks right")
    assert resp.status_code == 200, resp.text
    done = gw.wait_status(held["id"], {"completed"})
    assert done.response_code == 200
    refunds = refunds_for(upstream, charge["id"])
    assert len(refunds) == 1 and refunds[0]["amount"] == 4999
    sent = [r for r in upstream.requests() if r["method"] == "POST" and r["path"] == "/v1/refunds"]
    assert len(sent) == 1 and sent[0]["idempotency_key"] == "idem-approve-1"

    action = gw.admin("GET", f"/cosigner/v1/actions/{held['id']}").json()
    assert action["status"] == "completed"
    assert action["response_code"] == 200
    assert action["response_body"]["id"] == refunds[0]["id"]
    assert action["decisions"][0] | {"created": 0} == {
        "reviewer": "ops@example.com",
        "decision": "approve",
        "note": "looks right",
        "via": "api",
        "created": 0,
    }
    assert action["agent"] == "sk_test_…6789"
    assert action["completed_at"] is not None and action["attempts"] == 1
    assert "credential" not in str(action).lower() and TEST_STRIPE_KEY not in str(action)
    # Terminal: deciding again changes nothing.
    again = approve(gw, held["id"], reviewer="other@example.com")
    assert again.status_code == 409
    assert len(refunds_for(upstream, charge["id"])) == 1


def test_forward_without_agent_key_uses_cosigner_action_id(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge()
    held = hold_refund(gw, charge["id"]).json()
    approve(gw, held["id"])
    gw.wait_status(held["id"], {"completed"})
    sent = [r for r in upstream.requests() if r["path"] == "/v1/refunds" and r["method"] == "POST"]
    assert [r["idempotency_key"] for r in sent] == [f"cosigner-{held['id']}"]


def test_small_refund_allowed_synchronously_with_receipt(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=5000)
    refund = agent(gw).v1.refunds.create(
        params={"charge": charge["id"], "amount": 700, "metadata": {"auto": "yes"}}
    )
    assert refund.object == "refund" and refund.amount == 700
    assert gw.app is not None
    receipt = gw.call(gw.app[STORE].requests(10))[0]
    assert (receipt.rule, receipt.decision, receipt.status, receipt.path) == (
        "small-refunds",
        "allow",
        200,
        "/v1/refunds",
    )


# -- idempotency ---------------------------------------------------------------------------


def test_same_key_same_body_is_the_same_action_then_replays_stripes_answer(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=9000)
    client = agent(gw)
    params = {"charge": charge["id"], "amount": 1500}
    first = client.v1.refunds.create(params=params, options={"idempotency_key": "k-same"})
    second = client.v1.refunds.create(params=params, options={"idempotency_key": "k-same"})
    assert first["id"] == second["id"]
    approve(gw, first["id"])
    gw.wait_status(first["id"], {"completed"})
    replay = client.v1.refunds.create(params=params, options={"idempotency_key": "k-same"})
    assert replay.object == "refund" and replay.amount == 1500
    assert len(refunds_for(upstream, charge["id"])) == 1
    resp = raw(
        gw,
        "POST",
        "/v1/refunds",
        data={"charge": charge["id"], "amount": "1500"},
        headers={"Idempotency-Key": "k-same"},
    )
    assert resp.status_code == 200 and resp.headers["Cosigner-Action"] == first["id"]

    with pytest.raises(stripe.IdempotencyError):
        client.v1.refunds.create(
            params={"charge": charge["id"], "amount": 1600}, options={"idempotency_key": "k-same"}
        )


@pytest.mark.parametrize("outcome", ["rejected", "cancelled", "expired"])
def test_closed_actions_answer_403_with_their_code(
    gw: GatewayThread, upstream: Any, outcome: str
) -> None:
    charge = upstream.create_charge()
    client = agent(gw)
    metadata = {"expire": "fast"} if outcome == "expired" else {}
    params = {"charge": charge["id"], "amount": 300, "metadata": metadata}
    held = client.v1.refunds.create(params=params, options={"idempotency_key": f"k-{outcome}"})
    if outcome == "rejected":
        r = gw.admin(
            "POST",
            f"/cosigner/v1/actions/{held['id']}/reject",
            json={"reviewer": "ops@example.com", "note": "no"},
        )
        assert r.status_code == 200 and r.json()["status"] == "rejected"
    elif outcome == "cancelled":
        r = raw(gw, "POST", f"/cosigner/v1/actions/{held['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    else:
        time.sleep(1.3)
    with pytest.raises(stripe.PermissionError) as err:
        client.v1.refunds.create(params=params, options={"idempotency_key": f"k-{outcome}"})
    assert err.value.json_body["error"]["code"] == f"cosigner_{outcome}"
    assert approve(gw, held["id"]).status_code == 409
    assert gw.action(held["id"]).status == outcome
    assert gw.action(held["id"]).credential_sealed is None
    assert refunds_for(upstream, charge["id"]) == []


def test_identical_held_deletes_join_one_action(gw: GatewayThread, upstream: Any) -> None:
    first = raw(gw, "DELETE", "/v1/subscriptions/sub_123")
    second = raw(gw, "DELETE", "/v1/subscriptions/sub_123")
    other = raw(gw, "DELETE", "/v1/subscriptions/sub_456")
    assert first.status_code == second.status_code == other.status_code == 202
    assert first.json()["id"] == second.json()["id"] != other.json()["id"]
    gw.admin(
        "POST",
        f"/cosigner/v1/actions/{first.json()['id']}/reject",
        json={"reviewer": "ops@example.com"},
    )
    third = raw(gw, "DELETE", "/v1/subscriptions/sub_123")
    assert third.status_code == 202 and third.json()["id"] != first.json()["id"]


# -- quorum, edits, expiry, cancel ----------------------------------------------------------


def test_quorum_needs_distinct_reviewers(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=500_000)
    held = hold_refund(gw, charge["id"], amount=200_000).json()
    assert held["rule"] == "two-person-refunds" and held["approvals_required"] == 2
    assert approve(gw, held["id"], reviewer="alice@example.com").json()["status"] == (
        "awaiting_approval"
    )
    dup = approve(gw, held["id"], reviewer="alice@example.com")
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "reviewer_already_decided"
    assert refunds_for(upstream, charge["id"]) == []
    assert approve(gw, held["id"], reviewer="bob@example.com").status_code == 200
    gw.wait_status(held["id"], {"completed"})
    assert len(refunds_for(upstream, charge["id"])) == 1


def test_reviewer_may_lower_an_editable_amount_and_the_forward_uses_it(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=8000)
    held = hold_refund(gw, charge["id"], amount=6000).json()
    not_editable = approve(gw, held["id"], params={"charge": "ch_other"})
    assert not_editable.status_code == 400
    assert not_editable.json()["error"]["param"] == "charge"
    raised = approve(gw, held["id"], params={"amount": "7000"})
    assert raised.status_code == 400
    assert gw.action(held["id"]).status == "awaiting_approval"
    ok = approve(gw, held["id"], params={"amount": "2500"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["modified_params"] == {"amount": "2500"}
    gw.wait_status(held["id"], {"completed"})
    (refund,) = refunds_for(upstream, charge["id"])
    assert refund["amount"] == 2500
    assert gw.admin("GET", f"/cosigner/v1/actions/{held['id']}").json()["params"]["amount"] == (
        "6000"
    )


def test_expired_action_is_never_forwarded(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge()
    held = hold_refund(gw, charge["id"], **{"metadata[expire]": "fast"}).json()
    assert held["rule"] == "quick-expiry" and held["expires_at"] - held["created"] == 1
    time.sleep(1.3)
    polled = raw(gw, "GET", f"/cosigner/v1/actions/{held['id']}")
    assert polled.json()["status"] == "expired"
    assert approve(gw, held["id"]).status_code == 409
    assert refunds_for(upstream, charge["id"]) == []


def test_agents_see_and_cancel_only_their_own_actions(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge()
    held = hold_refund(gw, charge["id"]).json()
    path = f"/cosigner/v1/actions/{held['id']}"
    assert raw(gw, "GET", path).json()["status"] == "awaiting_approval"
    assert raw(gw, "GET", path, key=OTHER_KEY).status_code == 404
    assert raw(gw, "POST", path + "/cancel", key=OTHER_KEY).status_code == 404
    assert raw(gw, "GET", path, key=None).status_code == 401
    assert raw(gw, "POST", path + "/approve", json={"reviewer": "me"}).status_code == 401
    assert raw(gw, "POST", path + "/cancel").json()["status"] == "cancelled"
    assert raw(gw, "POST", path + "/cancel").status_code == 409


def test_concurrent_approvals_forward_once(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=9000)
    held = hold_refund(gw, charge["id"], amount=900).json()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(lambda i: approve(gw, held["id"], reviewer=f"r{i}@x.io").status_code, range(8))
        )
    assert codes.count(200) == 1 and codes.count(409) == 7
    gw.wait_status(held["id"], {"completed"})
    time.sleep(0.3)
    assert len(refunds_for(upstream, charge["id"])) == 1


def test_upstream_that_keeps_failing_leaves_a_failed_action(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, forward_attempts=2)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge()
        held = hold_refund(gw, charge["id"]).json()
        upstream.fault(path_prefix="/v1/refunds", method="POST", fail=[503, 503])
        approve(gw, held["id"])
        failed = gw.wait_status(held["id"], {"failed"}, timeout=20)
        assert failed.attempts == 2 and "503" in failed.last_error
        assert failed.credential_sealed is None
        assert refunds_for(upstream, charge["id"]) == []


# -- the list API ---------------------------------------------------------------------------


def test_list_is_newest_first_with_pagination_and_filters(gw: GatewayThread, upstream: Any) -> None:
    ids = [raw(gw, "DELETE", f"/v1/subscriptions/sub_{i}").json()["id"] for i in range(5)]
    gw.admin("POST", f"/cosigner/v1/actions/{ids[0]}/reject", json={"reviewer": "x@y.z"})
    page = gw.admin("GET", "/cosigner/v1/actions?limit=2").json()
    assert page["object"] == "list" and page["has_more"] is True
    got = [a["id"] for a in page["data"]]
    nxt = gw.admin("GET", f"/cosigner/v1/actions?limit=2&starting_after={got[-1]}").json()
    rest = gw.admin("GET", f"/cosigner/v1/actions?limit=10&starting_after={nxt['data'][-1]['id']}")
    all_ids = got + [a["id"] for a in nxt["data"]] + [a["id"] for a in rest.json()["data"]]
    assert sorted(all_ids) == sorted(ids) and len(set(all_ids)) == 5
    assert rest.json()["has_more"] is False
    rejected = gw.admin("GET", "/cosigner/v1/actions?status=rejected").json()["data"]
    assert [a["id"] for a in rejected] == [ids[0]]
    assert gw.admin("GET", "/cosigner/v1/actions?status=bogus").status_code == 400
    assert gw.admin("GET", "/cosigner/v1/actions?limit=0").status_code == 400
    assert raw(gw, "GET", "/cosigner/v1/actions").status_code == 401


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        (
            "POST",
            "/v1/refunds",
            {
                "data": b"amount=1&amount=2",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            400,
            "parameter_duplicated",
        ),
        (
            "POST",
            "/v1/refunds",
            {"data": b"%ZZ=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            400,
            None,
        ),
        (
            "POST",
            "/v1/refunds",
            {"data": b"\x00\xff\xfe", "headers": {"Content-Type": "application/octet-stream"}},
            415,
            None,
        ),
        (
            "POST",
            "/v1/refunds",
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            None,
        ),
        ("POST", "/v1/refunds", {"data": b"a=" + b"x" * 70_000}, 413, None),
        (
            "POST",
            "/v1/refunds",
            {"data": {"charge": "x"}, "headers": {"X-HTTP-Method-Override": "GET"}},
            400,
            None,
        ),
        ("GET", "/v1/charges/%2E%2E/refunds", {}, 400, None),
        ("GET", "/v1/charges/ch_1;x=1", {}, 400, None),
        ("GET", "/cosigner/v1/actions/act_nope", {}, 404, "resource_missing"),
    ],
)
def test_bad_input_gets_a_stripe_shaped_error_and_the_gateway_keeps_serving(
    tmp_path: Path,
    fake_stripe: str,
    upstream: Any,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES, max_body=65_536)) as gw:
        resp = raw(gw, method, path, **kwargs)
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["type"] and err["message"]
        if code:
            assert err["code"] == code
        assert gw.admin("GET", "/cosigner/v1/actions").json()["data"] == []
        assert raw(gw, "GET", "/healthz").status_code == 200


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Authorization": "Bearer wrong-token"}, {"reviewer": "a"}, 401),
        ({}, {"reviewer": "a"}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, "{", 400),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"reviewer": ""}, 400),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"reviewer": "a", "extra": 1}, 400),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, [1, 2], 400),
    ],
)
def test_bad_admin_calls_change_nothing(
    gw: GatewayThread, upstream: Any, headers: dict[str, str], body: Any, status: int
) -> None:
    charge = upstream.create_charge()
    held = hold_refund(gw, charge["id"]).json()
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, str) else {"json": body}
    resp = requests.post(
        f"{gw.url}/cosigner/v1/actions/{held['id']}/approve", headers=headers, timeout=10, **kwargs
    )
    assert resp.status_code == status
    assert resp.json()["error"]["message"]
    assert gw.action(held["id"]).status == "awaiting_approval"
