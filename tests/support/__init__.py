"""Test-only support code: real peers (a fake Stripe, an SMTP sink) for the test suite."""
