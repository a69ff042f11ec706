-- The journal: one row per event, its body the store's versioned, checksummed envelope
-- (hodei-core/src/codec.rs). The primary key is the last line of defence against two writers
-- of one sequence number; the check that an append starts at next_seq is the first.
CREATE TABLE hodei_events (
    saga_id text COLLATE "C" NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 0),
    body bytea NOT NULL,
    PRIMARY KEY (saga_id, seq)
);

-- One row per saga: its summary record (the same envelope), the journal's next sequence number
-- (what an append must start at) and whether it is in flight. "C" collation: listings page in
-- the byte order of ids, which is SagaId's order.
CREATE TABLE hodei_sagas (
    id text COLLATE "C" PRIMARY KEY,
    next_seq bigint NOT NULL CHECK (next_seq >= 1),
    record bytea NOT NULL,
    in_flight boolean NOT NULL
);

-- Recovery reads the sagas in flight: its cost follows their number, not the table's size.
CREATE INDEX hodei_sagas_in_flight ON hodei_sagas (id) WHERE in_flight;
