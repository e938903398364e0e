-- Incremental verify (ledger/verify.py) re-adds the holds of each key budget
-- period a new hold or entry touched; this partial index finds them without
-- a scan of every hold. Only budgeted holds are in it: a call made with a key
-- without a budget writes nothing more.
CREATE INDEX holds_key_budget_period ON holds (key_id, budget_period_start)
    WHERE budget_period_start IS NOT NULL;
