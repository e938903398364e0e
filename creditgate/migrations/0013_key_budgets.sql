-- Per-key budgets (issue 17): an API key may cap what its calls spend, for its
-- lifetime or per calendar day, week (Monday first) or month in the zone of
-- [throttle] day_zone.
--
-- The cap is enforced by the reserve statement itself (ledger/holds.py,
-- ledger/group_commit.py), in the same statement as the account's balance
-- check: a key's spend row is upserted under the account's balance row lock,
-- with ON CONFLICT ... WHERE spent + reserved + amount <= budget, so
-- concurrent reserves on any number of processes cannot pass the budget.
--
-- Periods need no cron: spend is kept per (key, period start), and the period
-- start is computed from the database clock in the statement that reserves.
-- A new period is a new row, so the reset is exact to the microsecond. A hold
-- records the period it counted in; its settle, release or expiry adjusts that
-- row, even after the period ended.

CREATE TABLE key_budgets (
    key_id     uuid PRIMARY KEY REFERENCES api_keys (id),
    budget     bigint NOT NULL CHECK (budget >= 0),           -- µc
    period     text CHECK (period IN ('day', 'week', 'month')), -- NULL: a lifetime cap
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE key_budget_spend (
    key_id       uuid NOT NULL REFERENCES api_keys (id),
    -- '-infinity' for a lifetime budget.
    period_start timestamptz NOT NULL,
    spent        bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),    -- debits of its settled holds
    reserved     bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0), -- its live holds
    PRIMARY KEY (key_id, period_start)
);

-- The key a hold was made with (NULL: a session), and, when that key had a
-- budget, the period start its amount was counted in. No foreign key on
-- key_id: it would cost every reserve a lookup for a column that is a record.
ALTER TABLE holds
    ADD COLUMN key_id uuid,
    ADD COLUMN budget_period_start timestamptz;

-- A hold still changes only by ending: its key and period are fixed too.
DROP TRIGGER holds_end_once ON holds;
CREATE TRIGGER holds_end_once
    BEFORE UPDATE ON holds
    FOR EACH ROW
    WHEN (OLD.ended_at IS NOT NULL
          OR NEW.ended_at IS NULL
          OR (NEW.id, NEW.account_id, NEW.amount, NEW.request_id, NEW.model,
              NEW.created_at, NEW.expires_at, NEW.key_id, NEW.budget_period_start)
             IS DISTINCT FROM
             (OLD.id, OLD.account_id, OLD.amount, OLD.request_id, OLD.model,
              OLD.created_at, OLD.expires_at, OLD.key_id, OLD.budget_period_start))
    EXECUTE FUNCTION creditgate_hold_end_once();

-- The start of the budget period containing `at` ('-infinity' for a lifetime
-- budget, period NULL) and the start of the next one (NULL: never resets),
-- in `zone`. SQL functions the planner inlines: the reserve pays no call.
CREATE FUNCTION creditgate_budget_period_start(period text, zone text, at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN period IS NULL THEN '-infinity'::timestamptz
                ELSE date_trunc(period, at, zone) END
$$;

CREATE FUNCTION creditgate_budget_period_end(period text, zone text, at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN period IS NULL THEN NULL
                ELSE date_trunc(
                    period,
                    ((date_trunc(period, at, zone) AT TIME ZONE zone)
                        + ('1 ' || period)::interval) AT TIME ZONE zone,
                    zone)
           END
$$;
