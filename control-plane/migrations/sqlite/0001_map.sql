-- The map head: one row, locked by every write transaction so that version order is commit
-- order (docs/control-plane.md, "Ordering").
CREATE TABLE meta (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    version           INTEGER NOT NULL,
    checksum          INTEGER NOT NULL,
    epoch             TEXT    NOT NULL
);

CREATE TABLE regions (
    id           TEXT    PRIMARY KEY,
    name         TEXT    NOT NULL,
    jurisdiction TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- A workspace's region must exist: every write transaction checks it under the meta row's
-- lock, and deleting a region checks no workspace calls it home under the same lock. (A
-- foreign key would say it again at a per-row cost that dominates bulk imports.)
CREATE TABLE workspaces (
    id         TEXT    PRIMARY KEY,
    region     TEXT    NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('active', 'frozen')),
    epoch      INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX workspaces_by_region ON workspaces (region, id);

-- Every change ever made, in version order: the change feed (within its retained window)
-- and the history audits read (all of it).
CREATE TABLE history (
    version INTEGER PRIMARY KEY,
    kind    TEXT    NOT NULL CHECK (kind IN ('workspace', 'region')),
    key     TEXT    NOT NULL,
    op      TEXT    NOT NULL CHECK (op IN ('put', 'delete')),
    region  TEXT,
    state   TEXT,
    epoch   INTEGER,
    name    TEXT,
    jurisdiction TEXT,
    actor   TEXT    NOT NULL,
    reason  TEXT,
    at      INTEGER NOT NULL
);
CREATE INDEX history_by_key ON history (kind, key, version);

CREATE TABLE tokens (
    name       TEXT    PRIMARY KEY,
    role       TEXT    NOT NULL CHECK (role IN ('admin', 'operator', 'auditor', 'proxy')),
    hash       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE fleet (
    proxy_id        TEXT    PRIMARY KEY,
    edge_region     TEXT    NOT NULL,
    applied_version INTEGER NOT NULL,
    drained_version INTEGER,
    checksum        TEXT    NOT NULL,
    epoch           TEXT    NOT NULL,
    first_seen      INTEGER NOT NULL,
    last_seen       INTEGER NOT NULL,
    -- The token that reports for this proxy id.
    token           TEXT    NOT NULL
);
