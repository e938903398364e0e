-- Issue 17: each debit keeps its token counts by kind.
--
-- `breakdown` is what the proxy measured, as proxy.pricing's
-- `recorded_breakdown`: {"input": n, "output": n} always, plus the non-zero
-- kinds (cached_input, cache_write, audio_input, audio_output, reasoning,
-- accepted_prediction, rejected_prediction) and, for a call charged from the
-- upstream's reported cost, "upstream_cost" (an exact decimal string).
-- Entries from before this migration, grants and the other kinds have none.
--
-- The ledger stays append-only: the column is written with its entry, and
-- the existing triggers refuse any UPDATE of it. Adding a nullable column
-- rewrites nothing; the CHECK is NOT VALID so the (all-NULL) existing rows
-- are not scanned under the table lock, and every new row is checked.

ALTER TABLE ledger_entries ADD COLUMN breakdown jsonb;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_breakdown_object
    CHECK (breakdown IS NULL OR jsonb_typeof(breakdown) = 'object') NOT VALID;
