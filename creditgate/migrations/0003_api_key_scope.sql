-- API keys get a scope: 'account' keys act for their account; 'admin' keys may
-- also call the admin routes (issue 4). Existing keys stay account keys.
ALTER TABLE api_keys
    ADD COLUMN scope text NOT NULL DEFAULT 'account' CHECK (scope IN ('account', 'admin'));

-- Counting an account's live keys (the 20-key limit) and listing them reads
-- only the keys not revoked.
CREATE INDEX api_keys_account_unrevoked ON api_keys (account_id, created_at DESC)
    WHERE revoked_at IS NULL;
