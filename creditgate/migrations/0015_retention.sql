-- Retention of operational tables (issue 19, creditgate/retention.py): the
-- pruner finds finished rows past their period through these partial
-- indexes, which hold only finished rows (pending ones, which the hot paths
-- of the webhook and notification workers read, are not in them).
CREATE INDEX webhook_events_finished ON webhook_events (received_at)
    WHERE status IN ('processed', 'failed');
CREATE INDEX low_balance_alerts_finished ON low_balance_alerts (finished_at)
    WHERE status IN ('sent', 'failed', 'skipped');
