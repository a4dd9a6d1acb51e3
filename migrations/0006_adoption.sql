-- What `loyaltyd adopt` needs to upgrade a database that already runs the
-- original design, in place and online (SPEC §13). A database that
-- `migrate` builds from empty has the same objects, so the two paths end in
-- the same schema.

-- score_delta: a column kept by a trigger instead of a stored generated
-- column. Adding a stored generated column to a table that has rows
-- rewrites the whole table under an ACCESS EXCLUSIVE lock (a minute and more
-- at 20,000,000 events); a plain column is added at once and back-filled in
-- short batches. Measured: a 500-row INSERT costs the same either way
-- (4.45-4.68 ms against 4.47-4.63 ms). The trigger computes the delta from
-- the same rule on every INSERT and on every UPDATE of its inputs, so a
-- writer cannot store another value.
ALTER TABLE moderation_events ALTER COLUMN score_delta DROP EXPRESSION;

CREATE FUNCTION moderation_events_delta() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    -- The scoring rule of SPEC §4: multiplier (topic 5, otherwise 1) times
    -- sign (approved +1, rejected -1, calibrated 0).
    NEW.score_delta := (CASE NEW.outcome WHEN 'approved' THEN 1 WHEN 'rejected' THEN -1 ELSE 0 END)
                     * (CASE NEW.content_type WHEN 'topic' THEN 5 ELSE 1 END);
    RETURN NEW;
END $$;
ALTER FUNCTION moderation_events_delta() SET search_path FROM CURRENT;
CREATE TRIGGER moderation_events_delta BEFORE INSERT OR UPDATE OF outcome, content_type, score_delta
    ON moderation_events FOR EACH ROW EXECUTE FUNCTION moderation_events_delta();

-- Rows of the original data that cannot satisfy loyaltyd's constraints
-- (an outcome no rule scores, an event of a user that no longer exists...),
-- moved here with the reason, never dropped.
CREATE TABLE adoption_quarantine (
    id             BIGSERIAL   PRIMARY KEY,
    source_table   TEXT        NOT NULL,
    reason         TEXT        NOT NULL,
    original       JSONB       NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Values the adoption changed where the rule was clear (a drifted score
-- recomputed from its events, an outcome spelt 'Approved', a queue key that
-- two items shared), with the value before.
CREATE TABLE adoption_repairs (
    id          BIGSERIAL   PRIMARY KEY,
    kind        TEXT        NOT NULL,
    subject     TEXT        NOT NULL,
    before      JSONB,
    after       JSONB,
    repaired_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
