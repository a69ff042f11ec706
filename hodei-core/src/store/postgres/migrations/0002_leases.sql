-- Several engines on one database. Each engine renews one row here once per beat: its lease on
-- every saga it owns at once. A saga whose owner's lease has lapsed (or that has no owner) is
-- claimed by a live engine, which moves its epoch on.
CREATE TABLE hodei_engines (
    id text COLLATE "C" PRIMARY KEY,
    lease_until timestamptz NOT NULL
);

-- The saga's owner and the epoch of its ownership: every write checks the epoch in its own
-- transaction, so an engine that lost the saga can never write it again. Sagas from before
-- this migration have no owner and are claimed by the first engine that looks.
ALTER TABLE hodei_sagas
    ADD COLUMN owner text COLLATE "C",
    ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- The epoch each event was written at: along a journal, epochs never go back.
ALTER TABLE hodei_events ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- A beat's claim looks up the sagas of lapsed engines (and those with no owner) by owner.
CREATE INDEX hodei_sagas_owner ON hodei_sagas (owner) WHERE in_flight;
