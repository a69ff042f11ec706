-- The operator API's tokens, shared by every engine's API on the database: a token issued by
-- one is accepted by all, and a revocation holds on all of them at the next request. Only the
-- SHA-256 of a token's secret is kept.
CREATE TABLE hodei_api_tokens (
    selector text COLLATE "C" PRIMARY KEY,
    secret_sha256 bytea NOT NULL,
    name text COLLATE "C" NOT NULL UNIQUE,
    role text NOT NULL,
    created_unix bigint NOT NULL,
    revoked boolean NOT NULL DEFAULT false
);
