-- Listing by status, newest first: the index carries rowid, so no sort of every match.
CREATE INDEX actions_status_newest ON actions (status, created);
