-- Newest first to the insertion, not just to the second: order by (created, rowid).
-- An index on created carries the rowid, so a backward scan yields exactly that order.
CREATE INDEX actions_newest ON actions (created);
DROP INDEX actions_created;
