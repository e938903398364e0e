-- Polar billing and signed webhooks (issue 7).
--
--   * The usage export reads settled debits in commit-safe order: (tx_id, seq)
--     past a single cursor row, only from transactions older than every running
--     one. The cursor moves only after Polar acknowledged a batch.
--   * Events Polar refuses one by one (422) are parked, never retried forever.
--   * Each webhook delivery id is stored once (primary key), so a redelivery is
--     recognised and applied at most once.
--   * Refund reversals record what they could take back and the rest as debt,
--     so a refund of spent credits never breaks the available-balance CHECK.

-- ---------------------------------------------------------------- usage export

CREATE TABLE polar_export_cursor (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    tx_id      xid8 NOT NULL DEFAULT '0',
    seq        bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO polar_export_cursor DEFAULT VALUES;

-- The exporter's scan: debits past the cursor, in (tx_id, seq) order.
CREATE INDEX ledger_entries_debit_export ON ledger_entries (tx_id, seq) WHERE kind = 'debit';

-- What Polar acknowledged, per account and minute: reconciliation's "exported"
-- side, small however many events there are.
CREATE TABLE polar_export_totals (
    account_id uuid NOT NULL REFERENCES accounts (id),
    minute     timestamptz NOT NULL,
    events     bigint NOT NULL CHECK (events > 0),
    credits    bigint NOT NULL CHECK (credits >= 0),
    tokens     bigint NOT NULL CHECK (tokens >= 0),
    PRIMARY KEY (account_id, minute)
);

CREATE TABLE polar_parked_events (
    entry_id   uuid PRIMARY KEY REFERENCES ledger_entries (id),
    account_id uuid NOT NULL REFERENCES accounts (id),
    error      text NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- webhooks

CREATE TABLE webhook_events (
    source          text NOT NULL CHECK (source IN ('polar', 'clerk')),
    webhook_id      text NOT NULL CHECK (length(webhook_id) BETWEEN 1 AND 255),
    event_type      text NOT NULL,
    -- Only the fields processing needs (ids, amounts, states), never emails.
    facts           jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'processed', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    outcome         text,
    PRIMARY KEY (source, webhook_id)
);
CREATE INDEX webhook_events_pending ON webhook_events (next_attempt_at) WHERE status = 'pending';

-- ---------------------------------------------------------------- Polar objects

-- Polar customer → account (customer.* events and our checkouts' external id).
CREATE TABLE polar_customers (
    customer_id text PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts (id),
    deleted_at  timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX polar_customers_account ON polar_customers (account_id);

-- An account's plans. One row per Polar subscription, holding its newest state
-- by the object's own modified_at (webhooks arrive out of order).
CREATE TABLE subscriptions (
    id                   text PRIMARY KEY,
    account_id           uuid NOT NULL REFERENCES accounts (id),
    product_id           text NOT NULL,
    plan                 text NOT NULL,
    tier                 text,
    status               text NOT NULL,
    current_period_start timestamptz,
    current_period_end   timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    source_modified_at   timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_account ON subscriptions (account_id);

-- Each paid order once: what it granted (the money is the ledger entry).
CREATE TABLE polar_orders (
    order_id        text PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    product_id      text NOT NULL,
    subscription_id text,
    billing_reason  text NOT NULL,
    granted         bigint NOT NULL CHECK (granted >= 0),
    grant_entry_id  uuid UNIQUE REFERENCES ledger_entries (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((grant_entry_id IS NULL) = (granted = 0))
);

CREATE TABLE polar_checkouts (
    id                 text PRIMARY KEY,
    account_id         uuid NOT NULL REFERENCES accounts (id),
    product_id         text NOT NULL,
    url                text NOT NULL,
    status             text NOT NULL,
    expires_at         timestamptz NOT NULL,
    source_modified_at timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX polar_checkouts_open ON polar_checkouts (account_id, product_id, created_at DESC)
    WHERE status = 'open';

-- ---------------------------------------------------------------- ledger: reversals

-- A request to take back credits (a refund). What the account could still
-- cover became a 'reversal' entry; the rest is debt. The row is also the
-- request's idempotency record, written in the same statement as the entry.
CREATE TABLE ledger_reversals (
    idempotency_key text PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    reverses        text NOT NULL,
    requested       bigint NOT NULL CHECK (requested > 0),
    reversed        bigint NOT NULL CHECK (reversed >= 0 AND reversed <= requested),
    debt            bigint GENERATED ALWAYS AS (requested - reversed) STORED,
    entry_id        uuid UNIQUE REFERENCES ledger_entries (id),
    reason          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((entry_id IS NULL) = (reversed = 0))
);
CREATE INDEX ledger_reversals_reverses ON ledger_reversals (reverses);
CREATE INDEX ledger_reversals_debt ON ledger_reversals (account_id) WHERE requested > reversed;

CREATE TRIGGER ledger_reversals_append_only
    BEFORE UPDATE OR DELETE ON ledger_reversals
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER ledger_reversals_no_truncate
    BEFORE TRUNCATE ON ledger_reversals
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();
