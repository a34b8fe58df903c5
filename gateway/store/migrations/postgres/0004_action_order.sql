-- Newest first to the insertion, not just to the second: order by (created, seq).
ALTER TABLE actions ADD COLUMN seq BIGSERIAL;
CREATE INDEX actions_newest ON actions (created DESC, seq DESC);
DROP INDEX actions_created;
