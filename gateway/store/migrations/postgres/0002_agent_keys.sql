-- Mirrors sqlite/0002_agent_keys.sql: gateway-issued agent keys (PRODUCT.md §3a).
-- Only the SHA-256 of a key is kept; its prefix and last four characters for display.
-- A per-agent Stripe key is sealed with AES-GCM (purpose "agent-stripe-key", AAD = name).
CREATE TABLE agent_keys (
    name TEXT COLLATE "C" PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    last4 TEXT NOT NULL,
    stripe_key_sealed BYTEA,
    created BIGINT NOT NULL,
    revoked_at BIGINT
);
