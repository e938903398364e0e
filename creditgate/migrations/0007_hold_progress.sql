-- Progress of a streaming call, recorded while it streams (issue 14): what the
-- call has generated so far, priced. Not money: holds and entries stay
-- append-only; this row is overwritten as the stream goes. When a process
-- dies mid-stream, its hold expires and the sweeper charges the last recorded
-- progress (marked estimated) instead of ending the hold for free.
CREATE TABLE hold_progress (
    hold_id       uuid PRIMARY KEY REFERENCES holds (id),
    input_tokens  integer NOT NULL CHECK (input_tokens >= 0),
    output_tokens integer NOT NULL CHECK (output_tokens >= 0),
    cost          bigint NOT NULL CHECK (cost >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
