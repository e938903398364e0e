-- 0018: retention of the holds that moved no money (issue 19; docs/operations.md,
-- "Retention").
--
-- A hold released, or expired with nothing charged, is the record that a call
-- was reserved and charged nothing: its reservation was taken and given back
-- in full, no entry names it, and no balance, lot or budget sum counts it once
-- it ended. After `[retention] unbilled_holds_days` it may be deleted, and only
-- such a hold, only through creditgate_prune_unbilled_holds(): the delete
-- guard below lets a row go when that function is the one deleting, the hold
-- ended more than 7 days ago (by the database's clock, whatever the caller
-- asks: a late settlement or a replayed reserve comes within minutes), and no
-- ledger entry names it (a debit of an expired hold, late, keeps it for good).
-- Every other hold — live, settled, or expired and charged — stays, as before.

CREATE INDEX holds_unbilled_ended ON holds (ended_at) WHERE outcome IN ('released', 'expired');

CREATE FUNCTION creditgate_hold_delete_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('creditgate.pruning_unbilled_holds', true) = 'on'
       AND OLD.outcome IN ('released', 'expired')
       AND OLD.ended_at < now() - interval '7 days'
       AND NOT EXISTS (SELECT 1 FROM ledger_entry_keys k WHERE k.hold_id = OLD.id)
    THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

DROP TRIGGER holds_no_delete ON holds;
CREATE TRIGGER holds_no_delete
    BEFORE DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION creditgate_hold_delete_guard();

-- Deletes (or, dry_run, counts) up to `batch` unbilled holds that ended before
-- `cutoff` and more than 7 days ago; the number. SECURITY DEFINER: the serving
-- role has no DELETE on holds, and may run this (retention, every server).
CREATE FUNCTION creditgate_prune_unbilled_holds(cutoff timestamptz, batch integer,
                                                dry_run boolean)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    gone integer;
    until timestamptz := LEAST(cutoff, now() - interval '7 days');
BEGIN
    IF dry_run THEN
        SELECT count(*) INTO gone FROM holds h
        WHERE h.outcome IN ('released', 'expired') AND h.ended_at < until
          AND NOT EXISTS (SELECT 1 FROM ledger_entry_keys k WHERE k.hold_id = h.id)
          AND NOT EXISTS (SELECT 1 FROM hold_progress p WHERE p.hold_id = h.id);
        RETURN gone;
    END IF;
    PERFORM set_config('creditgate.pruning_unbilled_holds', 'on', true);
    DELETE FROM holds WHERE id IN (
        SELECT h.id FROM holds h
        WHERE h.outcome IN ('released', 'expired') AND h.ended_at < until
          AND NOT EXISTS (SELECT 1 FROM ledger_entry_keys k WHERE k.hold_id = h.id)
          AND NOT EXISTS (SELECT 1 FROM hold_progress p WHERE p.hold_id = h.id)
        ORDER BY h.ended_at
        LIMIT LEAST(GREATEST(batch, 0), 100000)
    );
    GET DIAGNOSTICS gone = ROW_COUNT;
    PERFORM set_config('creditgate.pruning_unbilled_holds', 'off', true);
    RETURN gone;
END
$$;
REVOKE ALL ON FUNCTION creditgate_prune_unbilled_holds(timestamptz, integer, boolean) FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION creditgate_prune_unbilled_holds(timestamptz, integer, boolean)'
                   ' SET search_path = %I, pg_temp', current_schema());
END
$$;
