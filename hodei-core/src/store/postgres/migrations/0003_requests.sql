-- Operators' requests (cancel, signal, pause, resume, retry now) for sagas that another engine
-- drives, waiting for their owner: the owner's journal write that applies one deletes it in the
-- same transaction, so each is applied once. Posting one notifies channel hodei_requests with
-- the owner's id; owners also look at every beat, in case notifications do not arrive.
CREATE TABLE hodei_requests (
    id bigserial PRIMARY KEY,
    saga_id text COLLATE "C" NOT NULL,
    body bytea NOT NULL,
    posted_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX hodei_requests_saga ON hodei_requests (saga_id);
