-- Gateway-issued agent keys (PRODUCT.md §3a). Only the SHA-256 of a key is kept; its
-- prefix and last four characters are kept for display (cos_…abcd). A per-agent Stripe
-- key is sealed with AES-GCM (purpose "agent-stripe-key", the name as associated data).
CREATE TABLE agent_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    last4 TEXT NOT NULL,
    stripe_key_sealed BLOB,
    created INTEGER NOT NULL,
    revoked_at INTEGER
);
