-- Actions: held requests and their fate. Status changes only by conditional UPDATE.
CREATE TABLE actions (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated REAL NOT NULL,
    expires_at INTEGER NOT NULL,
    agent TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT NOT NULL,
    content_type TEXT,
    body BLOB NOT NULL,
    request_hash TEXT NOT NULL,
    params TEXT NOT NULL,
    headers TEXT NOT NULL,
    summary TEXT NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    reviewers TEXT NOT NULL,
    editable TEXT NOT NULL,
    idempotency_key TEXT,
    join_key TEXT,
    account TEXT,
    justification TEXT,
    callback_url TEXT,
    credential_sealed BLOB,
    context TEXT NOT NULL DEFAULT '{}',
    modified_params TEXT,
    response_code INTEGER,
    response_body TEXT,
    response_headers TEXT,
    last_error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    completed_at INTEGER,
    lease_until REAL
);
CREATE UNIQUE INDEX actions_idempotency ON actions (agent, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX actions_join ON actions (agent, join_key) WHERE join_key IS NOT NULL;
CREATE INDEX actions_status ON actions (status, expires_at);
CREATE INDEX actions_created ON actions (created DESC, id DESC);
CREATE INDEX actions_agent ON actions (agent, created DESC);
CREATE INDEX actions_rule ON actions (rule, created DESC);

CREATE TABLE decisions (
    action_id TEXT NOT NULL REFERENCES actions (id),
    reviewer TEXT NOT NULL,
    decision TEXT NOT NULL,
    note TEXT,
    via TEXT NOT NULL,
    created INTEGER NOT NULL,
    params TEXT,
    PRIMARY KEY (action_id, reviewer)
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX events_action ON events (action_id, id);

CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    agent TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    rule TEXT NOT NULL,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    action_id TEXT
);
CREATE INDEX requests_ts ON requests (ts DESC);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    action_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    lease_until REAL
);
CREATE INDEX outbox_due ON outbox (kind, status, next_attempt_at);
CREATE INDEX outbox_action ON outbox (action_id);
