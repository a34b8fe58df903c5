-- Mirrors sqlite/0001_initial.sql. Ids compare bytewise (COLLATE "C") so that
-- keyset pagination orders exactly as on SQLite, whatever the database locale.
-- JSON columns are `json`, not `jsonb`: it keeps keys in the order they were sent.
CREATE TABLE actions (
    id TEXT COLLATE "C" PRIMARY KEY,
    status TEXT NOT NULL,
    created BIGINT NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    expires_at BIGINT NOT NULL,
    agent TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT NOT NULL,
    content_type TEXT,
    body BYTEA NOT NULL,
    request_hash TEXT NOT NULL,
    params JSON NOT NULL,
    headers JSON NOT NULL,
    summary TEXT NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    reviewers JSON NOT NULL,
    editable JSON NOT NULL,
    idempotency_key TEXT,
    join_key TEXT,
    account TEXT,
    justification TEXT,
    callback_url TEXT,
    credential_sealed BYTEA,
    context JSON NOT NULL DEFAULT '{}',
    modified_params JSON,
    response_code INTEGER,
    response_body TEXT,
    response_headers JSON,
    last_error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    completed_at BIGINT,
    lease_until DOUBLE PRECISION
);
CREATE UNIQUE INDEX actions_idempotency ON actions (agent, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX actions_join ON actions (agent, join_key) WHERE join_key IS NOT NULL;
CREATE INDEX actions_status ON actions (status, expires_at);
CREATE INDEX actions_created ON actions (created DESC, id DESC);
CREATE INDEX actions_agent ON actions (agent, created DESC);
CREATE INDEX actions_rule ON actions (rule, created DESC);

CREATE TABLE decisions (
    id BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    action_id TEXT COLLATE "C" NOT NULL REFERENCES actions (id),
    reviewer TEXT NOT NULL,
    decision TEXT NOT NULL,
    note TEXT,
    via TEXT NOT NULL,
    created BIGINT NOT NULL,
    params JSON,
    PRIMARY KEY (action_id, reviewer)
);

CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action_id TEXT COLLATE "C" NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    data JSON NOT NULL
);
CREATE INDEX events_action ON events (action_id, id);

CREATE TABLE requests (
    id TEXT COLLATE "C" PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    agent TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    rule TEXT NOT NULL,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    action_id TEXT
);
CREATE INDEX requests_ts ON requests (ts DESC);

CREATE TABLE outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    action_id TEXT COLLATE "C" NOT NULL,
    payload JSON NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX outbox_due ON outbox (kind, status, next_attempt_at);
CREATE INDEX outbox_action ON outbox (action_id);
