-- Mirrors sqlite/0003_budgets.sql: one row per request a budgeted rule matched.
-- Rows are only inserted by a transaction that re-counted the window under an
-- advisory lock on (rule, scope_key), so two replicas racing for the last unit
-- cannot both get it.
CREATE TABLE budget_entries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule TEXT NOT NULL,
    scope_key TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    amount BIGINT NOT NULL DEFAULT 0,
    ref TEXT NOT NULL
);
CREATE INDEX budget_entries_window ON budget_entries (rule, scope_key, ts);
