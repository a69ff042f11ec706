-- Which process holds an engine's name now. A process restarted under the name of one that only
-- seemed dead (frozen, cut off) takes the row over with a new incarnation; the earlier process
-- then finds it superseded at its next beat and claims, creates and renews nothing more, so two
-- processes never drive sagas under one name.
ALTER TABLE hodei_engines ADD COLUMN incarnation bigint NOT NULL DEFAULT 0;
