-- The control planes' PKI, shared by every engine on the database: one CA (the first engine to
-- start creates it, every other one reads it back), one-time registration tokens any engine
-- redeems once, revocations every engine checks at each handshake, and the record of which
-- workers hold a certificate until when. Times are the control plane's clock, in microseconds
-- since the Unix epoch, so that a test's clock rules them as it rules the certificates.
CREATE TABLE hodei_pki_ca (
    id integer PRIMARY KEY CHECK (id = 1),
    cert_pem text NOT NULL,
    key_pem text NOT NULL
);

-- A token is `<selector>.<secret>`; only the secret's SHA-256 is kept.
CREATE TABLE hodei_pki_tokens (
    selector text COLLATE "C" PRIMARY KEY,
    secret_sha256 bytea NOT NULL,
    worker_id text COLLATE "C" NOT NULL,
    expires_at bigint NOT NULL,
    used boolean NOT NULL DEFAULT false
);

CREATE INDEX hodei_pki_tokens_expiry ON hodei_pki_tokens (expires_at);

CREATE TABLE hodei_pki_revocations (
    kind text NOT NULL CHECK (kind IN ('worker', 'serial')),
    value text COLLATE "C" NOT NULL,
    PRIMARY KEY (kind, value)
);

CREATE TABLE hodei_pki_certified (
    worker_id text COLLATE "C" PRIMARY KEY,
    not_after bigint NOT NULL
);
