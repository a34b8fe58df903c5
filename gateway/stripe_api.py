"""What a request to Stripe's API may look like, beyond what ``canonical`` reads.

The canonical reading makes a request unambiguous to *us*; these checks make
sure Stripe reads it the same way, so that no rule judges something other than
what Stripe will act on:

- Paths are under ``/v1`` or ``/v2``, and Stripe's fixed segments are spelled
  as Stripe spells them: lower case, no suffix. ``/v1/REFUNDS`` or
  ``/v1/refunds.json`` would slip past a rule written for ``/v1/refunds``
  while an upstream that folded case or dropped format suffixes acted on it.
  Ids keep their case: ``cus_AbC`` is not a word here.
- A body is in the encoding its API version reads: form for ``/v1``, JSON for
  ``/v2``. ``POST /v1/refunds`` with a JSON ``{"amount": 500}`` would pass a
  small-refund rule while Stripe, reading no amount, refunded everything.
- POST parameters are in the body only. An upstream that reads a POST's body
  and not its query string would act without what the rules saw there.
- No ``_method`` parameter: Rack's method override reads it from a POST body.

``PATH_WORDS`` are the fixed segments of the paths the official Stripe SDK
calls (tests/test_attacks.py checks the installed SDK against it, so a newer
SDK with new resources makes that test name the words to add), plus a few
retired resources.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import InvalidPath, InvalidRequest, UnsupportedMediaType

if TYPE_CHECKING:  # canonical imports this module
    from gateway.canonical import CanonicalRequest

API_ROOTS = frozenset({"v1", "v2"})
BODY_TYPES = {"v1": "application/x-www-form-urlencoded", "v2": "application/json"}
METHOD_OVERRIDE_PARAM = "_method"

_WORDS = """
    3d_secure accept account account_links account_sessions account_tokens accounts acknowledge
    activate active_entitlements add_lines adjustments advance alerts amount_details_line_items
    apple_pay application_fees apply_customer_balance approve apps archive associations attach
    attach_payment authentications authorizations balance balance_settings balance_transactions
    billing billing_portal bitcoin calculations cancel cancel_action capabilities capture
    cardholders cards cash_balance cash_balance_transactions charges checkout climate close
    collect_inputs collect_payment_method commerce computed_upfront_line_items configurations
    confirm confirm_microdeposits confirm_payment_intent confirmation_tokens connection_tokens
    core country_specs coupons create_force_capture create_from_calculation create_preview
    create_reversal create_unlinked_refund credit credit_balance_summary
    credit_balance_transactions credit_grants credit_notes credit_reversals customer_sessions
    customers deactivate debit_reversals decline delete deliver detach disable disconnect
    discount disputes domains early_fraud_warnings enable entitlements ephemeral_keys
    event_destinations event_summaries events exchange_rates expire external_accounts fail
    features feedback_options file_links files finalize finalize_amount financial_accounts
    financial_addresses financial_connections find forwarding fraud_challenges
    fund_cash_balance funding_instructions gb_bank_accounts identity imports inbound_transfers
    increment increment_authorization installs invoice_payments invoice_rendering_templates
    invoiceitems invoices issuing line_items lines locations login_links mandates
    mark_uncollectible meter_event_adjustments meter_event_session meter_event_stream
    meter_events meters migrate money_management onboarding_links order_returns orders
    outbound_payments outbound_setup_intents outbound_transfers owners pause pay
    payment_attempt_records payment_evaluations payment_intents payment_links
    payment_method_configurations payment_method_domains payment_methods payment_records
    payout_intents payout_methods payout_methods_bank_account_spec payouts pdf person_tokens
    personalization_designs persons physical_bundles ping plans post present_payment_method
    preview prices process_payment_intent process_setup_intent product_catalog products
    promotion_codes quotes radar reactivate readers received_credits received_debits receivers
    recipient_verifications recipients redact refresh refresh_fx_quote
    refresh_recipient_verification refresh_regulatory_receipt refund refund_payment refunds
    registrations reject release remove_lines report_payment report_payment_attempt
    report_payment_attempt_canceled report_payment_attempt_failed
    report_payment_attempt_guaranteed report_payment_attempt_informational report_refund
    report_runs report_types reporting requests respond resume return reversals reverse reviews
    scheduled_query_runs search secrets send send_microdeposits sessions set_reader_display
    settings setup_attempts setup_intents ship shipping shipping_rates sigma skus
    source_transactions sources submit subscribe subscription_items subscription_schedules
    subscriptions succeed succeed_input_collection suppliers tax tax_codes tax_ids tax_rates
    terminal test_clocks test_helpers three_d_secure timeout_input_collection tokens topups
    transaction_entries transactions transfers treasury trial_offers unarchive uninstall
    unreject unsubscribe update_lines us_bank_accounts usage_record_summaries usage_records
    validate value_list_items value_lists vault verification_reports verification_sessions
    verify verify_microdeposits void webhook_endpoints
"""
PATH_WORDS = frozenset(_WORDS.split())


def check_api_path(path: str) -> None:
    """Refuse a canonical path outside /v1 and /v2, or spelling a Stripe word another way."""
    segments = path.split("/")
    if len(segments) < 2 or segments[1] not in API_ROOTS:
        raise InvalidPath("Stripe API paths start with /v1/ or /v2/.")
    for segment in segments[2:]:
        if segment in PATH_WORDS:  # spelled as Stripe spells it (most segments)
            continue
        # Any other spelling of a word (another case, a suffix) is refused.
        base = segment.partition(".")[0]
        if base.lower() in PATH_WORDS:
            raise InvalidPath(
                f"The path segment {segment!r} is not how Stripe spells {base.lower()!r}: "
                "Stripe paths are lower case, without suffixes."
            )


def check_api_request(req: CanonicalRequest) -> None:
    """Refuse a canonical request Stripe could read differently from the rules (see above)."""
    if req.content_type is not None:
        root = req.path.split("/")[1]
        expected = BODY_TYPES.get(root)
        if expected is not None and req.content_type != expected:
            raise UnsupportedMediaType(
                f"Stripe's /{root} API takes {expected} bodies, not {req.content_type}."
            )
    if req.method == "POST" and req.query:
        raise InvalidRequest(
            "Send POST parameters in the body, not in the query string.", code="query_on_post"
        )
    if METHOD_OVERRIDE_PARAM in req.params:
        raise InvalidRequest(
            f"The {METHOD_OVERRIDE_PARAM} parameter (a method override) is not accepted.",
            param=METHOD_OVERRIDE_PARAM,
        )
