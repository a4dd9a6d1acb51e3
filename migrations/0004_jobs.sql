-- Cluster-wide claims of scheduled job ticks: the daemon that moves `last_tick`
-- forward to a tick's scheduled instant runs that tick; every other daemon
-- firing for the same instant finds it claimed and skips.
CREATE TABLE job_ticks (
    job        TEXT        PRIMARY KEY,
    last_tick  TIMESTAMPTZ NOT NULL,
    claimed_by TEXT        NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
