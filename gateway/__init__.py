"""Cosigner: a self-hosted approval gateway for AI agents that call the Stripe API."""

__version__ = "0.1.0"
