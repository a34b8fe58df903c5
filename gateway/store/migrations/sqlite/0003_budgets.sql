-- Budgets: one row per request a budgeted rule matched (allowed, held, whatever the action).
-- A rule's usage is the count and the sum of `amount` of its rows in the window
-- (ts > now - per) for one scope key ('agent:<name>' or 'global'). Rows are only
-- inserted by a transaction that re-counted the window first, so two requests
-- racing for the last unit cannot both get it.
CREATE TABLE budget_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    scope_key TEXT NOT NULL,
    ts REAL NOT NULL,
    amount INTEGER NOT NULL DEFAULT 0,
    ref TEXT NOT NULL
);
CREATE INDEX budget_entries_window ON budget_entries (rule, scope_key, ts);
