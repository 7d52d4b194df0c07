-- Moves (docs/moves.md). A move's map writes (freeze, switch, unfreeze) commit in the same
-- transaction as its phase change, so the phase and the map never disagree.
CREATE TABLE moves (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace      TEXT    NOT NULL,
    from_region    TEXT    NOT NULL,
    to_region      TEXT    NOT NULL,
    phase          TEXT    NOT NULL CHECK (phase IN
                       ('requested', 'freezing', 'frozen', 'switching', 'done', 'aborted')),
    actor          TEXT    NOT NULL,
    reason         TEXT,
    webhook        TEXT,
    timeout_ms     BIGINT  NOT NULL,
    freeze_version BIGINT,
    switch_version BIGINT,
    done_version   BIGINT,
    abort_version  BIGINT,
    requested_at   BIGINT  NOT NULL,
    freezing_at    BIGINT,
    frozen_at      BIGINT,
    switching_at   BIGINT,
    done_at        BIGINT,
    aborted_at     BIGINT,
    -- When the current phase outlived its timeout (reported, never acted on).
    stalled_at     BIGINT,
    abort_reason   TEXT
);
-- One open move per workspace.
CREATE UNIQUE INDEX moves_one_open_per_workspace ON moves (workspace)
    WHERE phase NOT IN ('done', 'aborted');
CREATE INDEX moves_by_workspace ON moves (workspace, id);

-- The admin audit trail's events besides map changes (those are in `history`): move phases,
-- tokens made and revoked, proxies removed from the fleet.
CREATE TABLE admin_events (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT  NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    subject TEXT    NOT NULL,
    move_id BIGINT,
    version BIGINT,
    reason  TEXT,
    detail  TEXT
);
CREATE INDEX admin_events_by_time ON admin_events (at, seq);
CREATE INDEX history_by_time ON history (at, version);
