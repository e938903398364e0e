-- Cache invalidation across processes (issue 15): every process caches API
-- key lookups, session accounts and resolved limits for a few seconds. A
-- change that must take effect at once — a key revoked or expired early, an
-- account closed or moved to another tier, a limit override set — notifies
-- channel creditgate_invalidate at commit, and each process's listener drops
-- the cached entries at once. Payloads: 'a:<account id>' or 'k:<key id>'.
-- The cache TTL stays the fallback while a listener is disconnected.
-- Only the columns the caches hold fire: last_used_at (written in batches)
-- and balances (another table) never do.

CREATE FUNCTION creditgate_notify_account() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('creditgate_invalidate', 'a:' || OLD.id::text);
    RETURN NULL;
END
$$;

CREATE FUNCTION creditgate_notify_api_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('creditgate_invalidate', 'k:' || OLD.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER accounts_invalidate_caches
    AFTER UPDATE ON accounts FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.tier IS DISTINCT FROM NEW.tier
          OR OLD.requests_per_minute IS DISTINCT FROM NEW.requests_per_minute
          OR OLD.tokens_per_minute IS DISTINCT FROM NEW.tokens_per_minute
          OR OLD.max_parallel IS DISTINCT FROM NEW.max_parallel
          OR OLD.messages_per_day IS DISTINCT FROM NEW.messages_per_day)
    EXECUTE FUNCTION creditgate_notify_account();

CREATE TRIGGER accounts_invalidate_caches_on_delete
    AFTER DELETE ON accounts FOR EACH ROW
    EXECUTE FUNCTION creditgate_notify_account();

CREATE TRIGGER api_keys_invalidate_caches
    AFTER UPDATE ON api_keys FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.scope IS DISTINCT FROM NEW.scope
          OR OLD.account_id IS DISTINCT FROM NEW.account_id
          OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.requests_per_minute IS DISTINCT FROM NEW.requests_per_minute
          OR OLD.tokens_per_minute IS DISTINCT FROM NEW.tokens_per_minute
          OR OLD.max_parallel IS DISTINCT FROM NEW.max_parallel
          OR OLD.messages_per_day IS DISTINCT FROM NEW.messages_per_day)
    EXECUTE FUNCTION creditgate_notify_api_key();

CREATE TRIGGER api_keys_invalidate_caches_on_delete
    AFTER DELETE ON api_keys FOR EACH ROW
    EXECUTE FUNCTION creditgate_notify_api_key();
