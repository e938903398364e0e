-- Reconcile by event time (issue 20): the exporter's per-account totals also
-- record the minute of the event timestamp Polar was sent, so reconciliation
-- can compare the ledger with Polar's meter quantities over the same window of
-- event time (Polar's quantities are by event timestamp and survive the
-- meter's billing-cycle resets).
--
-- A row is now (account, export minute, event minute). The export minute keeps
-- the lag logic (Polar counts an event hours after it acknowledged it); the
-- event minute places the units in a window.
--
-- Rows written before this migration did not record the event time; their
-- export minute stands in for it (a live exporter sends an event within
-- seconds of its debit, so only a backlog exported late lands in a later
-- window there).

ALTER TABLE polar_export_totals ADD COLUMN event_minute timestamptz;
UPDATE polar_export_totals SET event_minute = minute;
ALTER TABLE polar_export_totals ALTER COLUMN event_minute SET NOT NULL;
ALTER TABLE polar_export_totals DROP CONSTRAINT polar_export_totals_pkey;
ALTER TABLE polar_export_totals ADD PRIMARY KEY (account_id, minute, event_minute);
CREATE INDEX polar_export_totals_event_minute ON polar_export_totals (event_minute);
