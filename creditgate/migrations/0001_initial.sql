-- creditgate's first schema: accounts, API keys, and the ledger.
--
-- Invariants the database itself enforces (DESIGN.md §3):
--   * ledger_entries are append-only: UPDATE, DELETE and TRUNCATE raise.
--   * holds are created, then ended exactly once (settled, released or expired);
--     no other change, no DELETE, no TRUNCATE.
--   * account_balances.available = balance - reserved never passes below
--     -overdraft_limit (CHECK), so no code path can overspend.
--   * one debit per hold (unique hold_id), one entry per idempotency key.

CREATE TABLE accounts (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('user', 'org')),
    external_id text NOT NULL CHECK (length(external_id) BETWEEN 1 AND 255),
    tier        text NOT NULL DEFAULT 'free',
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'closed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, external_id)
);

-- Every account has exactly one balance row, created with it (so a write can
-- never miss it, and two first requests of a new account cannot race).
CREATE TABLE account_balances (
    account_id      uuid PRIMARY KEY REFERENCES accounts (id),
    balance         bigint NOT NULL DEFAULT 0,
    reserved        bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    overdraft_limit bigint NOT NULL DEFAULT 0 CHECK (overdraft_limit >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT available_within_overdraft CHECK (balance - reserved >= -overdraft_limit)
);

CREATE FUNCTION creditgate_create_balance_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO account_balances (account_id) VALUES (NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER accounts_balance_row
    AFTER INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION creditgate_create_balance_row();

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    account_id   uuid NOT NULL REFERENCES accounts (id),
    key_hash     bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    prefix       text NOT NULL,
    name         text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE holds (
    id         uuid PRIMARY KEY,
    account_id uuid NOT NULL REFERENCES accounts (id),
    amount     bigint NOT NULL CHECK (amount >= 0),
    request_id text,
    model      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    outcome    text CHECK (outcome IN ('settled', 'released', 'expired')),
    ended_at   timestamptz,
    CHECK ((outcome IS NULL) = (ended_at IS NULL))
);
-- The sweeper's and verify's view of live holds stays small however long the
-- history grows.
CREATE INDEX holds_active_expiry ON holds (expires_at) WHERE ended_at IS NULL;
CREATE INDEX holds_active_account ON holds (account_id) WHERE ended_at IS NULL;

CREATE TABLE ledger_entries (
    id              uuid PRIMARY KEY,
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    kind            text NOT NULL
                    CHECK (kind IN ('grant', 'debit', 'adjustment', 'reversal', 'expiry')),
    amount          bigint NOT NULL,
    idempotency_key text NOT NULL UNIQUE,
    -- SHA-256 of the request that wrote the entry: the same key with another
    -- request is a conflict, not a replay.
    fingerprint     bytea NOT NULL,
    hold_id         uuid UNIQUE REFERENCES holds (id),
    request_id      text,
    model           text,
    input_tokens    integer CHECK (input_tokens >= 0),
    output_tokens   integer CHECK (output_tokens >= 0),
    estimated       boolean NOT NULL DEFAULT false,
    -- Cost the account could not cover within its overdraft limit.
    uncollected     bigint NOT NULL DEFAULT 0 CHECK (uncollected >= 0),
    reason          text,
    -- The writing transaction, so an exporter can read entries in commit-safe
    -- order (an entry is only exported once every older transaction ended).
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (CASE kind
               WHEN 'grant' THEN amount > 0
               WHEN 'debit' THEN amount <= 0
               WHEN 'expiry' THEN amount < 0
               ELSE amount <> 0
           END)
);
CREATE INDEX ledger_entries_account_seq ON ledger_entries (account_id, seq DESC);
-- Credits granted (creditLimit) without scanning an account's debits.
CREATE INDEX ledger_entries_account_grants ON ledger_entries (account_id, created_at)
    INCLUDE (amount) WHERE kind IN ('grant', 'reversal');

CREATE FUNCTION creditgate_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();

-- A hold may change once: from live to ended, touching nothing else.
CREATE FUNCTION creditgate_hold_end_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.ended_at IS NOT NULL THEN
        RAISE EXCEPTION 'hold % already ended (%)', OLD.id, OLD.outcome
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.ended_at IS NULL
       OR (NEW.id, NEW.account_id, NEW.amount, NEW.request_id, NEW.model,
           NEW.created_at, NEW.expires_at)
          IS DISTINCT FROM
          (OLD.id, OLD.account_id, OLD.amount, OLD.request_id, OLD.model,
           OLD.created_at, OLD.expires_at)
    THEN
        RAISE EXCEPTION 'a hold can only be ended' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER holds_end_once
    BEFORE UPDATE ON holds
    FOR EACH ROW EXECUTE FUNCTION creditgate_hold_end_once();
CREATE TRIGGER holds_no_delete
    BEFORE DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change();
CREATE TRIGGER holds_no_truncate
    BEFORE TRUNCATE ON holds
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_refuse_change();
