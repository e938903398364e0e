-- Billing API parity (issue 10): recorded usage, low-balance notifications,
-- preferences, subscription refresh and cancellation, and usage:write keys.
--
-- Invariants this file adds:
--   * a recorded usage (POST /api/usage/record) is a debit like any call's: it
--     has its hold (0002's ledger_entries_debit_has_hold holds unchanged), a
--     hold inserted already settled, in the same statement as its debit and
--     its balance row update, for exactly the debited amount — "reserved and
--     settled at once". Its usage_records row (what the caller sent beside the
--     money) is written in that statement too and is append-only.
--   * a low-balance crossing is decided by the database: a trigger on the
--     balance row, in the transaction that posts the money, flips the row's
--     low_balance_below flag and queues exactly one alert per crossing. Two
--     processes cannot both see the same crossing: the flag is on the row
--     they both must lock to change the balance.
--   * API keys may carry the scope 'usage:write' (recording usage for their
--     own account besides what an account key may do).

-- ---------------------------------------------------------------- API key scope

ALTER TABLE api_keys DROP CONSTRAINT api_keys_scope_check;
ALTER TABLE api_keys
    ADD CONSTRAINT api_keys_scope_check CHECK (scope IN ('account', 'admin', 'usage:write'));

-- ---------------------------------------------------------------- recorded usage

-- What POST /api/usage/record stored beside its debit entry (the money is the
-- entry and its hold). Written in the entry's own statement (ledger/external.py).
CREATE TABLE usage_records (
    entry_id        uuid PRIMARY KEY REFERENCES ledger_entries (id),
    account_id      uuid NOT NULL REFERENCES accounts (id),
    -- The caller's idempotency key as sent (the entry's key is namespaced).
    client_key      text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- "tokens": priced from the model's config; "explicit": the caller's cost.
    cost_source     text NOT NULL CHECK (cost_source IN ('tokens', 'explicit')),
    allow_overdraft boolean NOT NULL,
    -- Who recorded it: "admin_token", "api_key:<id>" or "session:<user id>".
    recorded_by     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_records_account ON usage_records (account_id, created_at DESC);

CREATE TRIGGER usage_records_append_only
    BEFORE UPDATE OR DELETE ON usage_records
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER usage_records_no_truncate
    BEFORE TRUNCATE ON usage_records
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();

-- ---------------------------------------------------------------- preferences

CREATE TABLE account_preferences (
    account_id                uuid PRIMARY KEY REFERENCES accounts (id),
    notification_url          text CHECK (notification_url ~ '^https?://'
                                          AND length(notification_url) <= 2048),
    default_model             text CHECK (length(default_model) BETWEEN 1 AND 200),
    -- Standard Webhooks secret ("whsec_" + base64): kept to sign, shown once.
    signing_secret            text CHECK (signing_secret LIKE 'whsec\_%'),
    signing_secret_created_at timestamptz,
    updated_at                timestamptz NOT NULL DEFAULT now(),
    CHECK ((signing_secret IS NULL) = (signing_secret_created_at IS NULL))
);

-- ---------------------------------------------------------------- low balance

-- The threshold lives on the balance row so the trigger's WHEN clause can
-- test it without a lookup: for every account without a threshold, and every
-- update that does not change the state, no function runs at all (the hot
-- path's reserves and settles pay one expression).
ALTER TABLE account_balances
    ADD COLUMN low_balance_threshold bigint CHECK (low_balance_threshold >= 0),
    -- True from a crossing (available < threshold after a charge) until
    -- available is at or above the threshold again after money moves.
    ADD COLUMN low_balance_below boolean NOT NULL DEFAULT false;

-- One row per crossing: the notification outbox (notify/worker.py sends it).
CREATE TABLE low_balance_alerts (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id      uuid NOT NULL REFERENCES accounts (id),
    threshold       bigint NOT NULL,
    available       bigint NOT NULL,
    balance         bigint NOT NULL,
    crossed_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- pending → sending (claimed, lease_until) → sent | failed | skipped (no URL)
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped')),
    attempts        integer NOT NULL DEFAULT 0,
    lease_until     timestamptz,
    finished_at     timestamptz,
    last_error      text
);
CREATE INDEX low_balance_alerts_due ON low_balance_alerts (crossed_at)
    WHERE status IN ('pending', 'sending');
CREATE INDEX low_balance_alerts_account ON low_balance_alerts (account_id, crossed_at DESC);

-- Runs only when the row's state flips (see the WHEN clause below). A charge
-- that leaves available below the threshold is a crossing: flag set, one
-- alert queued, listeners woken at commit. Money moving back to or above the
-- threshold re-arms. Reservations alone (balance unchanged) never decide.
CREATE FUNCTION creditgate_low_balance_crossing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance - NEW.reserved < NEW.low_balance_threshold THEN
        IF NEW.balance < OLD.balance THEN
            NEW.low_balance_below := true;
            INSERT INTO low_balance_alerts (account_id, threshold, available, balance)
            VALUES (NEW.account_id, NEW.low_balance_threshold,
                    NEW.balance - NEW.reserved, NEW.balance);
            PERFORM pg_notify('creditgate_low_balance', NEW.account_id::text);
        END IF;
    ELSE
        NEW.low_balance_below := false;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER account_balances_low_balance
    BEFORE UPDATE ON account_balances
    FOR EACH ROW
    WHEN (NEW.low_balance_threshold IS NOT NULL
          AND NEW.balance IS DISTINCT FROM OLD.balance
          AND (NEW.balance - NEW.reserved < NEW.low_balance_threshold)
              IS DISTINCT FROM NEW.low_balance_below)
    EXECUTE FUNCTION creditgate_low_balance_crossing();

-- ---------------------------------------------------------------- subscriptions

ALTER TABLE subscriptions
    -- When GET /api/subscription last confirmed this state with Polar.
    ADD COLUMN refreshed_at timestamptz,
    -- When DELETE /api/subscription asked Polar to cancel at period end (the
    -- state itself changes only with Polar's webhook).
    ADD COLUMN cancel_requested_at timestamptz;
