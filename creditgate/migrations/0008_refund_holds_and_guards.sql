-- 0008: refunds of reserved credits are taken when the holds end; the
-- definitions of the ledger's guard triggers are recorded so `verify` can
-- tell when one was replaced.
--
-- Refunds. A refund used to take only what was available (balance − reserved)
-- and book the rest as debt — including credits merely reserved by calls in
-- flight, which became spendable again once those holds ended. Now the part
-- of a refund backed by reserved credits is *pending* on the balance row
-- (refund_pending ≤ reserved, so no new hold can use it), and the trigger
-- below takes it as a 'reversal' entry as soon as credits are available
-- again — at the end of the very statement that ends the hold (settle,
-- release, expiry sweep, batch), whatever code path that is. What the holds'
-- debits consumed can no longer be taken: when reserved drops below
-- refund_pending, the excess is written off as debt (spent before the refund
-- arrived).

-- refund_pending ≤ reserved holds after every statement (the trigger restores
-- it at the statement's end; a CHECK would see the row before that), and
-- `verify` checks it.
ALTER TABLE account_balances
    ADD COLUMN refund_pending bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT refund_pending_not_negative CHECK (refund_pending >= 0);

-- What the refund left pending at its arrival (part of neither `reversed`
-- nor debt yet); debt is now only what was already spent.
DROP INDEX ledger_reversals_debt;
ALTER TABLE ledger_reversals
    DROP COLUMN debt,
    ADD COLUMN pending bigint NOT NULL DEFAULT 0 CHECK (pending >= 0),
    ADD CONSTRAINT ledger_reversals_within_request CHECK (reversed + pending <= requested),
    ADD COLUMN debt bigint GENERATED ALWAYS AS (requested - reversed - pending) STORED;
CREATE INDEX ledger_reversals_debt ON ledger_reversals (account_id)
    WHERE requested > reversed + pending;

-- Each change of an account's refund_pending by the trigger: collected (a
-- reversal entry) and written off (debt). Per account, Σ pending of its
-- reversals = Σ (collected + written_off) + refund_pending; `verify` checks it.
CREATE TABLE refund_collections (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts (id),
    entry_id    uuid UNIQUE REFERENCES ledger_entries (id),
    collected   bigint NOT NULL CHECK (collected >= 0),
    written_off bigint NOT NULL CHECK (written_off >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((entry_id IS NULL) = (collected = 0)),
    CHECK (collected + written_off > 0)
);
CREATE INDEX refund_collections_account ON refund_collections (account_id);
CREATE TRIGGER refund_collections_append_only
    BEFORE UPDATE OR DELETE ON refund_collections
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER refund_collections_no_truncate
    BEFORE TRUNCATE ON refund_collections
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();

-- Runs only for an account with a refund pending (WHEN clause: other
-- accounts pay one comparison per balance update, and queue nothing). An
-- AFTER trigger fires once the whole statement is done — every entry it
-- inserted (a batch's debits included) already has its seq — so the
-- collection's entry comes last and chains from the row's balance then. The
-- row is locked by the statement. A statement that sets refund_pending itself
-- (a refund arriving, or this trigger's own UPDATE) is left alone.
CREATE FUNCTION creditgate_collect_refund() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER account_balances_collect_refund
    AFTER UPDATE ON account_balances
    FOR EACH ROW WHEN (OLD.refund_pending > 0)
    EXECUTE FUNCTION creditgate_collect_refund();

-- Guards. The definition of every trigger the ledger's invariants rest on,
-- and of its function, as the migrations left them. The migration runner
-- rewrites these rows in the transaction of each migration it applies, and
-- nothing else may (the serving role can only read them); `verify` compares
-- the live definitions against them.
CREATE TABLE ledger_guard_definitions (
    table_name          text NOT NULL,
    trigger_name        text NOT NULL,
    trigger_definition  text NOT NULL,
    function_definition text NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, trigger_name)
);
