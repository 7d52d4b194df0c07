-- Bumped at every token creation and deletion, so that every replica can tell its cache of
-- checked tokens is out of date.
ALTER TABLE meta ADD COLUMN tokens_version BIGINT NOT NULL DEFAULT 0;
