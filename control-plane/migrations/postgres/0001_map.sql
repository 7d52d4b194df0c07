-- The map head: one row, locked by every write transaction so that version order is commit
-- order (docs/control-plane.md, "Ordering").
CREATE TABLE meta (
    id                SMALLINT PRIMARY KEY CHECK (id = 1),
    version           BIGINT  NOT NULL,
    checksum          BIGINT  NOT NULL,
    epoch             TEXT    NOT NULL
);

CREATE TABLE regions (
    id           TEXT    PRIMARY KEY,
    name         TEXT    NOT NULL,
    jurisdiction TEXT    NOT NULL,
    version      BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);

-- A workspace's region must exist: every write transaction checks it under the meta row's
-- lock, and deleting a region checks no workspace calls it home under the same lock. (A
-- foreign key would say it again at a per-row cost that dominates bulk imports.)
CREATE TABLE workspaces (
    id         TEXT    PRIMARY KEY,
    region     TEXT    NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('active', 'frozen')),
    epoch      BIGINT  NOT NULL,
    version    BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);
CREATE INDEX workspaces_by_region ON workspaces (region, id);

-- Every change ever made, in version order: the change feed (within its retained window)
-- and the history audits read (all of it).
CREATE TABLE history (
    version BIGINT  PRIMARY KEY,
    kind    TEXT    NOT NULL CHECK (kind IN ('workspace', 'region')),
    key     TEXT    NOT NULL,
    op      TEXT    NOT NULL CHECK (op IN ('put', 'delete')),
    region  TEXT,
    state   TEXT,
    epoch   BIGINT ,
    name    TEXT,
    jurisdiction TEXT,
    actor   TEXT    NOT NULL,
    reason  TEXT,
    at      BIGINT  NOT NULL
);
CREATE INDEX history_by_key ON history (kind, key, version);

CREATE TABLE tokens (
    name       TEXT    PRIMARY KEY,
    role       TEXT    NOT NULL CHECK (role IN ('admin', 'operator', 'auditor', 'proxy')),
    hash       TEXT    NOT NULL UNIQUE,
    created_at BIGINT  NOT NULL
);

CREATE TABLE fleet (
    proxy_id        TEXT    PRIMARY KEY,
    edge_region     TEXT    NOT NULL,
    applied_version BIGINT  NOT NULL,
    drained_version BIGINT ,
    checksum        TEXT    NOT NULL,
    epoch           TEXT    NOT NULL,
    first_seen      BIGINT  NOT NULL,
    last_seen       BIGINT  NOT NULL,
    -- The token that reports for this proxy id.
    token           TEXT    NOT NULL
);
