-- Sales channels (app/stock/channels.py): each SKU's channels with their quota, priority and borrowing,
-- and each reservation line's units taken from its channel's quota, so that a rebuild restores the
-- channels and what each has used, and reconcile compares them. (0008 is the webhooks' migration.)
--
-- `channel_set` events carry a channel's settings; line events of a reservation naming a channel carry
-- `lq`, the units its line took from the quota. As 0004 and 0007 did, persist_event_batch() keeps its
-- signature and calls the previous body first; the channel row takes a batch's newest channel_set only if
-- it is newer than the row's (by stream position), the line's from_quota only from the very event the
-- line's row now reflects.

CREATE TABLE sku_channel (
    tenant      text    NOT NULL,
    sku         text    NOT NULL,
    channel     text    NOT NULL,
    quota       bigint  NOT NULL CHECK (quota >= 0),
    priority    integer NOT NULL,
    borrow      boolean NOT NULL,
    event_ms    bigint  NOT NULL,
    event_seq   bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sku, channel)
);

ALTER TABLE reservation_line
    ADD COLUMN from_quota bigint NOT NULL DEFAULT 0 CHECK (from_quota >= 0);

ALTER FUNCTION persist_event_batch(json, json, json, json, json) RENAME TO persist_event_batch_0007;

CREATE FUNCTION persist_event_batch(
    movement_rows json, sku_rows json, line_rows json, reservation_rows json, progress_rows json
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    new_rows bigint;
BEGIN
    new_rows := persist_event_batch_0007(movement_rows, sku_rows, line_rows, reservation_rows, progress_rows);

    INSERT INTO sku_channel AS c (tenant, sku, channel, quota, priority, borrow, event_ms, event_seq)
    SELECT DISTINCT ON (b.tenant, b.sku, b.channel)
           b.tenant, b.sku, b.channel, b.quota, b.priority, b.borrow = 1,
           split_part(b.event_id, '-', 1)::bigint, split_part(b.event_id, '-', 2)::bigint
    FROM json_to_recordset(movement_rows) AS b(type text, tenant text, sku text, channel text, quota bigint,
                                               priority int, borrow int, event_id text)
    WHERE b.type = 'channel_set'
    ORDER BY b.tenant, b.sku, b.channel, split_part(b.event_id, '-', 1)::bigint DESC,
             split_part(b.event_id, '-', 2)::bigint DESC
    ON CONFLICT (tenant, sku, channel) DO UPDATE SET
        quota = EXCLUDED.quota, priority = EXCLUDED.priority, borrow = EXCLUDED.borrow,
        event_ms = EXCLUDED.event_ms, event_seq = EXCLUDED.event_seq, updated_at = now()
    WHERE (EXCLUDED.event_ms, EXCLUDED.event_seq) > (c.event_ms, c.event_seq);

    UPDATE reservation_line AS l SET from_quota = b.from_quota
    FROM json_to_recordset(line_rows) AS b(reservation_id text, sku text, from_quota bigint, event_ms bigint,
                                           event_seq bigint)
    WHERE b.from_quota IS NOT NULL AND l.reservation_id = b.reservation_id AND l.sku = b.sku
      AND (l.event_ms, l.event_seq) = (b.event_ms, b.event_seq);

    RETURN new_rows;
END
$fn$;
