-- The job logs and results of control planes that share this database. An agent may send a
-- job's output to any of them and its saga may run on any, so the log lives where every one
-- of them reads it, and it outlives the machine of whichever received it.
CREATE TABLE hodei_job_logs (
    job text COLLATE "C" PRIMARY KEY,
    closed boolean NOT NULL DEFAULT false,
    -- The hub's encoding of the job's result, once it is stored.
    result bytea,
    -- The worker that runs the job and the control plane its session is with; between
    -- sessions `member` is NULL, since `detached_at`. While that holds (see `LogStore::holder`),
    -- an attempt of the job's step on any control plane waits for this job's result rather
    -- than running it again.
    worker text,
    member text COLLATE "C",
    -- Which of the member's sessions: a late record of one session's end must not detach the
    -- job from the next session of the same worker on the same control plane.
    session bigint,
    detached_at timestamptz
);

-- The jobs whose worker was on a session with an engine's control plane, for the beat that
-- forgets dead engines.
CREATE INDEX hodei_job_logs_member ON hodei_job_logs (member) WHERE member IS NOT NULL AND result IS NULL;

-- Each stream's end (where the next batch continues) and stored length (below the end only
-- past the cap).
CREATE TABLE hodei_job_log_streams (
    job text COLLATE "C" NOT NULL REFERENCES hodei_job_logs (job) ON DELETE CASCADE,
    stream smallint NOT NULL,
    end_offset bigint NOT NULL DEFAULT 0,
    stored bigint NOT NULL DEFAULT 0,
    truncated boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job, stream)
);

-- The stored bytes, each chunk keyed by the stream offset of its first byte. Only the append
-- below writes them, each chunk starting where the stream's stored bytes end, so the chunks of
-- a stream tile [0, stored) with neither gap nor overlap.
CREATE TABLE hodei_job_log_chunks (
    job text COLLATE "C" NOT NULL REFERENCES hodei_job_logs (job) ON DELETE CASCADE,
    stream smallint NOT NULL,
    start_offset bigint NOT NULL,
    bytes bytea NOT NULL,
    PRIMARY KEY (job, stream, start_offset)
);

-- The stored bytes of a stream in [lo, hi).
CREATE FUNCTION hodei_log_range(p_job text, p_stream smallint, lo bigint, hi bigint) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT coalesce(string_agg(
        substring(c.bytes FROM (greatest(lo, c.start_offset) - c.start_offset + 1)::integer
                  FOR (least(hi, c.start_offset + length(c.bytes)) - greatest(lo, c.start_offset))::integer),
        ''::bytea ORDER BY c.start_offset), ''::bytea)
    FROM hodei_job_log_chunks c
    WHERE c.job = p_job AND c.stream = p_stream
      AND c.start_offset < hi AND c.start_offset + length(c.bytes) > lo
$$;

-- Appends batches of one job, in order, in the caller's transaction: the bytes a stream already
-- has are compared and skipped, a batch past the end is refused (except past the cap, where
-- bytes are only counted), and past `cap` stored bytes a stream keeps counting and stores
-- nothing. Stops at the first batch it refuses, applying those before it, and says why:
-- one row (outcome, batch index from 1, offset), where outcome is 'ok', 'closed', 'gap' (offset:
-- the stream's end) or 'mismatch' (offset: the first byte that differs).
CREATE FUNCTION hodei_log_append(p_job text, p_streams smallint[], p_offsets bigint[], p_chunks bytea[], cap bigint)
RETURNS TABLE (outcome text, batch integer, at bigint)
LANGUAGE plpgsql AS $$
DECLARE
    is_closed boolean;
    i integer;
    st smallint;
    lo bigint;
    hi bigint;
    s record;
    ours bytea;
    theirs bytea;
    keep_end bigint;
    d integer;
BEGIN
    INSERT INTO hodei_job_logs (job) VALUES (p_job) ON CONFLICT (job) DO NOTHING;
    -- One writer of a job's log at a time, whichever control plane it runs on.
    SELECT l.closed INTO is_closed FROM hodei_job_logs l WHERE l.job = p_job FOR UPDATE;
    IF is_closed THEN
        RETURN QUERY SELECT 'closed'::text, 1, 0::bigint;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        st := p_streams[i];
        lo := p_offsets[i];
        hi := lo + length(p_chunks[i]);
        INSERT INTO hodei_job_log_streams (job, stream) VALUES (p_job, st) ON CONFLICT DO NOTHING;
        SELECT x.end_offset, x.stored, x.truncated INTO s
            FROM hodei_job_log_streams x WHERE x.job = p_job AND x.stream = st;
        IF lo > s.end_offset AND NOT s.truncated THEN
            RETURN QUERY SELECT 'gap'::text, i, s.end_offset;
            RETURN;
        END IF;
        IF lo < s.stored THEN
            ours := hodei_log_range(p_job, st, lo, least(hi, s.stored));
            theirs := substring(p_chunks[i] FROM 1 FOR length(ours));
            IF ours <> theirs THEN
                d := 0;
                WHILE d < length(ours) AND get_byte(ours, d) = get_byte(theirs, d) LOOP
                    d := d + 1;
                END LOOP;
                RETURN QUERY SELECT 'mismatch'::text, i, lo + d;
                RETURN;
            END IF;
        END IF;
        IF s.truncated THEN
            UPDATE hodei_job_log_streams SET end_offset = greatest(end_offset, hi)
                WHERE job = p_job AND stream = st;
        ELSIF hi > s.end_offset THEN
            keep_end := least(hi, s.end_offset + greatest(cap - s.stored, 0));
            IF keep_end > s.end_offset THEN
                INSERT INTO hodei_job_log_chunks (job, stream, start_offset, bytes)
                    VALUES (p_job, st, s.end_offset,
                            substring(p_chunks[i] FROM (s.end_offset - lo + 1)::integer
                                      FOR (keep_end - s.end_offset)::integer));
            END IF;
            UPDATE hodei_job_log_streams
                SET stored = keep_end, end_offset = hi, truncated = keep_end < hi
                WHERE job = p_job AND stream = st;
        END IF;
    END LOOP;
    RETURN QUERY SELECT 'ok'::text, 0, 0::bigint;
END
$$;
