-- Listing by status, newest first, without sorting every match.
CREATE INDEX actions_status_newest ON actions (status, created DESC, seq DESC);
