-- A counter of the shard's commits, advanced by every commit in the same statement that fences
-- it (UPDATE ... WHERE shard AND epoch AND commit_no). A running shard knows the value its last
-- commit left; a database that does not have it (a failover to a standby that lacks the last
-- commits, a point-in-time restore) is found at the next commit or the next check, and the shard
-- drops what it holds in memory and reloads. It also records whether a commit whose answer was
-- lost landed, with no reliance on transaction ids (which a promoted standby may reuse).
ALTER TABLE shard_owners ADD COLUMN commit_no bigint NOT NULL DEFAULT 0;
