-- 0017: ledger_entries partitioned by month (issue 19; docs/capacity.md,
-- "Partitioning ledger_entries").
--
-- A unique index on a partitioned table must contain the partition key, so
-- what must be unique across all time moves to a small table that is not
-- partitioned, written in the same statement as each entry (the posting
-- template, ledger/posting.py, and the refund-collection trigger below):
--
--   ledger_entry_keys (id PRIMARY KEY, idempotency_key UNIQUE, hold_id UNIQUE,
--                      created_at)
--
-- A replayed idempotency key or a second debit of a hold conflicts there,
-- however old the first entry is. Each entry references its key row by
-- (id, created_at) and is unique on (id, created_at) within its partition,
-- so an entry id is unique across all partitions: the database, not only the
-- code, forbids a second entry under one id. Foreign keys that named
-- ledger_entries (id) now name ledger_entry_keys (id).
--
-- The guards: the row triggers of the parent are cloned onto every
-- partition, present and future; the statement-level TRUNCATE guard is not
-- (PostgreSQL fires a partition's own TRUNCATE triggers only), so every
-- partition gets its own ledger_entries_no_truncate, made with it by
-- creditgate_ledger_partition(). Only the owner may create, detach or
-- truncate a partition. `verify` checks the triggers on every partition and
-- that every partition made (ledger_partitions) is still attached.
--
-- The existing rows are copied (same values, same seq, same tx_id; the
-- identity continues after the highest seq), in this migration's single
-- transaction, which holds the ledger's lock for the copy: about 100 s per
-- million entries here, to be planned as downtime past a few million.

CREATE TABLE ledger_entry_keys (
    id              uuid PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    -- A debit's hold: one debit per hold, for all time.
    hold_id         uuid UNIQUE,
    -- The entry's created_at (its partition): both are now() of the
    -- writing transaction.
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entry_keys_id_created UNIQUE (id, created_at)
);
CREATE TRIGGER ledger_entry_keys_append_only
    BEFORE UPDATE OR DELETE ON ledger_entry_keys
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER ledger_entry_keys_no_truncate
    BEFORE TRUNCATE ON ledger_entry_keys
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();

INSERT INTO ledger_entry_keys (id, idempotency_key, hold_id, created_at)
SELECT id, idempotency_key, hold_id, created_at FROM ledger_entries ORDER BY seq;

-- Foreign keys to entries now name the key table (same names, same columns).
DO $$
DECLARE
    fk record;
BEGIN
    FOR fk IN
        SELECT conrelid::regclass AS tbl, conname, pg_get_constraintdef(oid) AS def
        FROM pg_constraint
        WHERE contype = 'f' AND confrelid = 'ledger_entries'::regclass
        ORDER BY conrelid::regclass::text, conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.tbl, fk.conname);
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.tbl, fk.conname,
                       replace(fk.def, 'REFERENCES ledger_entries(id)',
                               'REFERENCES ledger_entry_keys(id)'));
    END LOOP;
END
$$;

ALTER TABLE ledger_entries RENAME TO ledger_entries_unpartitioned;
ALTER SEQUENCE ledger_entries_seq_seq RENAME TO ledger_entries_unpartitioned_seq_seq;

-- The columns in their old order, the constraints under their old names
-- (named here: the old table still holds the generated ones). The CHECKs that every row always met are
-- declared here; the two NOT VALID ones of 0002 (rows before 0002 lack
-- them) are added after the copy, NOT VALID again.
CREATE TABLE ledger_entries (
    id              uuid NOT NULL,
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    account_id      uuid NOT NULL
                    CONSTRAINT ledger_entries_account_id_fkey REFERENCES accounts (id),
    kind            text NOT NULL CONSTRAINT ledger_entries_kind_check
                    CHECK (kind IN ('grant', 'debit', 'adjustment', 'reversal', 'expiry')),
    amount          bigint NOT NULL,
    idempotency_key text NOT NULL,
    fingerprint     bytea NOT NULL,
    hold_id         uuid CONSTRAINT ledger_entries_hold_id_fkey REFERENCES holds (id),
    request_id      text,
    model           text,
    input_tokens    integer CONSTRAINT ledger_entries_input_tokens_check
                    CHECK (input_tokens >= 0),
    output_tokens   integer CONSTRAINT ledger_entries_output_tokens_check
                    CHECK (output_tokens >= 0),
    estimated       boolean NOT NULL DEFAULT false,
    uncollected     bigint NOT NULL DEFAULT 0
                    CONSTRAINT ledger_entries_uncollected_check CHECK (uncollected >= 0),
    reason          text,
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    lot_id          uuid,
    balance_after   bigint,
    breakdown       jsonb,
    CONSTRAINT ledger_entries_check CHECK (CASE kind
               WHEN 'grant' THEN amount > 0
               WHEN 'debit' THEN amount <= 0
               WHEN 'expiry' THEN amount < 0
               ELSE amount <> 0
           END),
    CONSTRAINT ledger_entries_expiry_only_on_grants
        CHECK (expires_at IS NULL OR kind = 'grant'),
    CONSTRAINT ledger_entries_expiry_names_its_lot
        CHECK ((lot_id IS NOT NULL) = (kind = 'expiry')),
    CONSTRAINT ledger_entries_breakdown_object
        CHECK (breakdown IS NULL OR jsonb_typeof(breakdown) = 'object')
) PARTITION BY RANGE (created_at);

-- Every partition made, with its range: `verify` checks each is still
-- attached (a detached month would take its entries out of the ledger).
CREATE TABLE ledger_partitions (
    name       text PRIMARY KEY,
    range_from timestamptz NOT NULL UNIQUE,
    range_to   timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (range_to > range_from)
);

-- The partition of the month (UTC) holding `month_start`, with its TRUNCATE
-- guard; false if it exists. Owner only (EXECUTE revoked from PUBLIC).
CREATE FUNCTION creditgate_ledger_partition(month_start timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamp := date_trunc('month', month_start AT TIME ZONE 'UTC');
    name text := 'ledger_entries_p' || to_char(lo, 'YYYYMM');
BEGIN
    -- One creator at a time (servers run this hourly, migrate too).
    PERFORM pg_advisory_xact_lock(hashtext('creditgate.ledger_partitions'));
    IF EXISTS (SELECT 1 FROM ledger_partitions WHERE range_from = lo AT TIME ZONE 'UTC') THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF ledger_entries FOR VALUES FROM (%L) TO (%L)',
                   name, lo AT TIME ZONE 'UTC', (lo + interval '1 month') AT TIME ZONE 'UTC');
    EXECUTE format('CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON %I'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change()', name);
    INSERT INTO ledger_partitions (name, range_from, range_to)
    VALUES (name, lo AT TIME ZONE 'UTC', (lo + interval '1 month') AT TIME ZONE 'UTC');
    RETURN true;
END
$$;

-- The partitions of this month and the next `months` (at most 36); the
-- number made. SECURITY DEFINER: the serving role may call it (it makes
-- only empty future partitions, never detaches or drops), so every server
-- keeps months ready (ledger/partitions.py) without owning the table.
CREATE FUNCTION creditgate_ledger_partitions_ahead(months integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    made integer := 0;
    base timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
BEGIN
    FOR i IN 0 .. LEAST(GREATEST(months, 0), 36) LOOP
        IF creditgate_ledger_partition((base + make_interval(months => i)) AT TIME ZONE 'UTC')
        THEN
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$$;
REVOKE ALL ON FUNCTION creditgate_ledger_partition(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION creditgate_ledger_partitions_ahead(integer) FROM PUBLIC;
-- A SECURITY DEFINER function resolves names in the schema it was made in only.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION creditgate_ledger_partitions_ahead(integer)'
                   ' SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION creditgate_ledger_partition(timestamptz)'
                   ' SET search_path = %I, pg_temp', current_schema());
END
$$;

-- The months the existing rows fall in, this month and the next twelve.
SELECT creditgate_ledger_partition(month AT TIME ZONE 'UTC')
FROM generate_series(
    date_trunc('month', COALESCE((SELECT min(created_at) FROM ledger_entries_unpartitioned),
                                 now()) AT TIME ZONE 'UTC'),
    date_trunc('month', now() AT TIME ZONE 'UTC'),
    interval '1 month') AS month;
SELECT creditgate_ledger_partitions_ahead(12);
-- The safety net: a row outside every month made lands here rather than
-- failing its insert; `verify` warns while it holds any row.
CREATE TABLE ledger_entries_default PARTITION OF ledger_entries DEFAULT;
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries_default
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();

-- The copy, in seq order, before any trigger exists on the new table (the
-- lots were allocated when the entries were first written).
INSERT INTO ledger_entries OVERRIDING SYSTEM VALUE
SELECT id, seq, account_id, kind, amount, idempotency_key, fingerprint, hold_id, request_id,
       model, input_tokens, output_tokens, estimated, uncollected, reason, tx_id, created_at,
       expires_at, lot_id, balance_after, breakdown
FROM ledger_entries_unpartitioned ORDER BY seq;
SELECT setval(pg_get_serial_sequence('ledger_entries', 'seq'),
              GREATEST((SELECT max(seq) FROM ledger_entries_unpartitioned),
                       (SELECT last_value FROM ledger_entries_unpartitioned_seq_seq)),
              true);

-- The copy checked before anything is dropped: the same rows, the same sums.
DO $$
BEGIN
    IF EXISTS (
        SELECT account_id, count(*), SUM(amount), max(seq), SUM(hashtext(id::text)::bigint)
        FROM ledger_entries_unpartitioned GROUP BY account_id
        EXCEPT
        SELECT account_id, count(*), SUM(amount), max(seq), SUM(hashtext(id::text)::bigint)
        FROM ledger_entries GROUP BY account_id
    ) OR (SELECT count(*) FROM ledger_entries_unpartitioned)
         <> (SELECT count(*) FROM ledger_entries)
      OR (SELECT count(*) FROM ledger_entries) <> (SELECT count(*) FROM ledger_entry_keys)
    THEN
        RAISE EXCEPTION 'ledger_entries copy differs from the original: nothing was changed';
    END IF;
END
$$;

DROP TABLE ledger_entries_unpartitioned;

ALTER TABLE ledger_entries
    -- An entry's id is unique across partitions: unique with created_at in
    -- its partition, and (id, created_at) must be its key row's.
    ADD CONSTRAINT ledger_entries_id_created UNIQUE (id, created_at),
    ADD CONSTRAINT ledger_entries_key_fk FOREIGN KEY (id, created_at)
        REFERENCES ledger_entry_keys (id, created_at),
    ADD CONSTRAINT ledger_entries_lot_fk FOREIGN KEY (lot_id) REFERENCES credit_lots (id),
    ADD CONSTRAINT ledger_entries_balance_after_recorded
        CHECK (balance_after IS NOT NULL) NOT VALID,
    ADD CONSTRAINT ledger_entries_debit_has_hold
        CHECK ((kind = 'debit') = (hold_id IS NOT NULL)) NOT VALID;

CREATE INDEX ledger_entries_hold ON ledger_entries (hold_id);
CREATE INDEX ledger_entries_account_seq ON ledger_entries (account_id, seq DESC);
CREATE INDEX ledger_entries_account_grants ON ledger_entries (account_id, created_at)
    INCLUDE (amount) WHERE kind IN ('grant', 'reversal');
CREATE INDEX ledger_entries_debit_export ON ledger_entries (tx_id, seq) WHERE kind = 'debit';
CREATE INDEX ledger_entries_tx_not_debit ON ledger_entries (tx_id) WHERE kind <> 'debit';

-- The guards of 0001 and 0002, on the parent: the row triggers are cloned
-- onto every partition; the TRUNCATE one guards a TRUNCATE of the parent
-- (each partition has its own, above).
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER ledger_entries_allocate_lots
    AFTER INSERT ON ledger_entries
    FOR EACH ROW WHEN (NEW.amount < 0 OR NEW.expires_at IS NOT NULL)
    EXECUTE FUNCTION creditgate_allocate_lots();

-- 0008's refund collection: its entry's key row first, in the same trigger.
CREATE OR REPLACE FUNCTION creditgate_collect_refund() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cur record;
    take bigint;
    keep bigint;
    entry uuid;
BEGIN
    IF NEW.refund_pending IS DISTINCT FROM OLD.refund_pending THEN
        RETURN NULL;
    END IF;
    SELECT balance, reserved, refund_pending INTO cur
    FROM account_balances WHERE account_id = NEW.account_id;
    take := LEAST(cur.refund_pending, GREATEST(0, cur.balance - cur.reserved));
    keep := LEAST(cur.refund_pending - take, cur.reserved);
    IF take = 0 AND keep = cur.refund_pending THEN
        RETURN NULL;
    END IF;
    IF take > 0 THEN
        entry := gen_random_uuid();
        INSERT INTO ledger_entry_keys (id, idempotency_key)
        VALUES (entry, 'refund-collect:' || entry::text);
        INSERT INTO ledger_entries
            (id, account_id, kind, amount, idempotency_key, fingerprint, reason, balance_after)
        VALUES (entry, NEW.account_id, 'reversal', -take, 'refund-collect:' || entry::text,
                sha256(convert_to('refund-collect', 'UTF8')),
                'refund of credits that were reserved when it arrived', cur.balance - take);
    END IF;
    INSERT INTO refund_collections (account_id, entry_id, collected, written_off)
    VALUES (NEW.account_id, entry, take, cur.refund_pending - take - keep);
    UPDATE account_balances
    SET balance = cur.balance - take, refund_pending = keep, updated_at = now()
    WHERE account_id = NEW.account_id;
    RETURN NULL;
END
$$;
