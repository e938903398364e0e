-- Throttle overrides (issue 5): an operator may set any of an account's or an
-- API key's limits; NULL inherits (the account from its tier, the key from its
-- account). A key's value only ever tightens its account's: the throttle
-- checks the account's buckets for every request, the key's besides.
-- Bounds match the config's: requests/tokens per minute are counted exactly in
-- Redis (Lua doubles) only up to 37,529,996,894.

ALTER TABLE accounts
    ADD COLUMN requests_per_minute bigint
        CHECK (requests_per_minute BETWEEN 1 AND 37529996894),
    ADD COLUMN tokens_per_minute bigint
        CHECK (tokens_per_minute BETWEEN 1 AND 37529996894),
    ADD COLUMN max_parallel integer CHECK (max_parallel BETWEEN 1 AND 1000000),
    ADD COLUMN messages_per_day integer CHECK (messages_per_day >= 1);

ALTER TABLE api_keys
    ADD COLUMN requests_per_minute bigint
        CHECK (requests_per_minute BETWEEN 1 AND 37529996894),
    ADD COLUMN tokens_per_minute bigint
        CHECK (tokens_per_minute BETWEEN 1 AND 37529996894),
    ADD COLUMN max_parallel integer CHECK (max_parallel BETWEEN 1 AND 1000000),
    ADD COLUMN messages_per_day integer CHECK (messages_per_day >= 1);

COMMENT ON COLUMN accounts.requests_per_minute IS 'throttle override; NULL: the tier''s';
COMMENT ON COLUMN accounts.tokens_per_minute IS 'throttle override; NULL: the tier''s';
COMMENT ON COLUMN accounts.max_parallel IS 'throttle override; NULL: the tier''s';
COMMENT ON COLUMN accounts.messages_per_day IS 'throttle override; NULL: the tier''s';
COMMENT ON COLUMN api_keys.requests_per_minute IS 'throttle override; NULL: the account''s';
COMMENT ON COLUMN api_keys.tokens_per_minute IS 'throttle override; NULL: the account''s';
COMMENT ON COLUMN api_keys.max_parallel IS 'throttle override; NULL: the account''s';
COMMENT ON COLUMN api_keys.messages_per_day IS 'throttle override; NULL: the account''s';
