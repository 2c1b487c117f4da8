-- One round trip per batch of events. The write-behind worker and confirm's write-through used to send
-- five statements one after the other; under a flash sale's load each round trip waits for a turn of a
-- busy event loop, and the worker fell behind the reservations (measured: 100-event batches took 65 ms
-- each, of which 4 ms were the worker's own CPU). app/worker/ledger.py builds the rows (JSON arrays of
-- objects; numbers may be the stream's strings, cast here) and calls this function once.
--
-- The statements run in the order concurrent writers lock rows in (stock_movement, sku,
-- reservation_line, reservation, worker_progress), each batch sorted by primary key, so writers wait for
-- each other but never deadlock. Everything is idempotent on the event id: the ledger row is ON CONFLICT
-- DO NOTHING and every projection row records the (ms, seq) of the event it reflects and only takes a
-- later one, so an event delivered twice or out of order leaves the same state.
--
-- progress_rows NULL: not the worker's own batch (write-through, rebuild); worker_progress is left alone.
-- Returns how many ledger rows were new.

CREATE FUNCTION persist_event_batch(
    movement_rows json, sku_rows json, line_rows json, reservation_rows json, progress_rows json
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    new_per_shard json;
    new_rows bigint;
BEGIN
    WITH inserted AS (
        INSERT INTO stock_movement (shard, event_id, tenant, sku, kind, quantity, reservation_id, user_id,
                                    on_hand_after, held_after, sold_after, occurred_at)
        SELECT b.shard, b.event_id, b.tenant, b.sku, b.type, b.qty, NULLIF(b.res, ''), NULLIF(b."user", ''),
               b.on_hand, b.held, b.sold, to_timestamp(b.at / 1000.0)
        FROM json_to_recordset(movement_rows) AS b(shard int, event_id text, tenant text, sku text, type text,
                                                   qty bigint, res text, "user" text, on_hand bigint,
                                                   held bigint, sold bigint, at bigint)
        ON CONFLICT (shard, event_id) DO NOTHING
        RETURNING stock_movement.shard
    )
    SELECT COALESCE(json_object_agg(c.shard, c.n), '{}'::json), COALESCE(sum(c.n), 0)
    INTO new_per_shard, new_rows
    FROM (SELECT i.shard, count(*) AS n FROM inserted AS i GROUP BY i.shard) AS c;

    -- Counters from the newest event of each SKU; settings from its newest sku_set (NULL settings: the
    -- batch had none, keep what is there). A SKU first seen through a non-catalogue event gets the defaults.
    INSERT INTO sku AS s (tenant, sku, on_hand, held, sold, event_ms, event_seq, safety_stock, mode,
                          hold_ttl_seconds, per_user_limit, settings_event_ms, settings_event_seq)
    SELECT b.tenant, b.sku, b.on_hand, b.held, b.sold, b.event_ms, b.event_seq, COALESCE(b.safety_stock, 0),
           COALESCE(b.mode, 'pre_reserve'), COALESCE(b.hold_ttl_seconds, 900), NULLIF(b.per_user_limit, 0),
           COALESCE(b.settings_event_ms, 0), COALESCE(b.settings_event_seq, 0)
    FROM json_to_recordset(sku_rows) AS b(tenant text, sku text, on_hand bigint, held bigint, sold bigint,
                                          event_ms bigint, event_seq bigint, safety_stock bigint, mode text,
                                          hold_ttl_seconds int, per_user_limit bigint, settings_event_ms bigint,
                                          settings_event_seq bigint)
    ON CONFLICT (tenant, sku) DO UPDATE SET
        on_hand = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (s.event_ms, s.event_seq)
                       THEN EXCLUDED.on_hand ELSE s.on_hand END,
        held = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (s.event_ms, s.event_seq)
                    THEN EXCLUDED.held ELSE s.held END,
        sold = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (s.event_ms, s.event_seq)
                    THEN EXCLUDED.sold ELSE s.sold END,
        event_ms = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (s.event_ms, s.event_seq)
                        THEN EXCLUDED.event_ms ELSE s.event_ms END,
        event_seq = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (s.event_ms, s.event_seq)
                         THEN EXCLUDED.event_seq ELSE s.event_seq END,
        safety_stock = CASE WHEN (EXCLUDED.settings_event_ms, EXCLUDED.settings_event_seq)
                                 > (s.settings_event_ms, s.settings_event_seq)
                            THEN EXCLUDED.safety_stock ELSE s.safety_stock END,
        mode = CASE WHEN (EXCLUDED.settings_event_ms, EXCLUDED.settings_event_seq)
                         > (s.settings_event_ms, s.settings_event_seq)
                    THEN EXCLUDED.mode ELSE s.mode END,
        hold_ttl_seconds = CASE WHEN (EXCLUDED.settings_event_ms, EXCLUDED.settings_event_seq)
                                     > (s.settings_event_ms, s.settings_event_seq)
                                THEN EXCLUDED.hold_ttl_seconds ELSE s.hold_ttl_seconds END,
        per_user_limit = CASE WHEN (EXCLUDED.settings_event_ms, EXCLUDED.settings_event_seq)
                                   > (s.settings_event_ms, s.settings_event_seq)
                              THEN EXCLUDED.per_user_limit ELSE s.per_user_limit END,
        settings_event_ms = CASE WHEN (EXCLUDED.settings_event_ms, EXCLUDED.settings_event_seq)
                                      > (s.settings_event_ms, s.settings_event_seq)
                                 THEN EXCLUDED.settings_event_ms ELSE s.settings_event_ms END,
        settings_event_seq = CASE WHEN (EXCLUDED.settings_event_ms, EXCLUDED.settings_event_seq)
                                       > (s.settings_event_ms, s.settings_event_seq)
                                  THEN EXCLUDED.settings_event_seq ELSE s.settings_event_seq END,
        updated_at = now();

    -- A line's status from its newest event; its quantity, held flag, deadline and creation from its
    -- reserve event (expires_at_ms NULL: this batch had no reserve event for the line, keep what is there).
    INSERT INTO reservation_line AS l (reservation_id, sku, shard, tenant, user_id, quantity, held, status,
                                       status_before, confirmed_how, expires_at_ms, created_at_ms, event_ms,
                                       event_seq)
    SELECT * FROM json_to_recordset(line_rows) AS b(
        reservation_id text, sku text, shard int, tenant text, user_id text, quantity bigint, held bool,
        status text, status_before text, confirmed_how text, expires_at_ms bigint, created_at_ms bigint,
        event_ms bigint, event_seq bigint)
    ON CONFLICT (reservation_id, sku) DO UPDATE SET
        held = CASE WHEN EXCLUDED.expires_at_ms IS NOT NULL THEN EXCLUDED.held ELSE l.held END,
        expires_at_ms = COALESCE(EXCLUDED.expires_at_ms, l.expires_at_ms),
        created_at_ms = COALESCE(EXCLUDED.created_at_ms, l.created_at_ms),
        status = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (l.event_ms, l.event_seq)
                      THEN EXCLUDED.status ELSE l.status END,
        status_before = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (l.event_ms, l.event_seq)
                             THEN EXCLUDED.status_before ELSE l.status_before END,
        confirmed_how = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (l.event_ms, l.event_seq)
                             THEN EXCLUDED.confirmed_how ELSE l.confirmed_how END,
        event_ms = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (l.event_ms, l.event_seq)
                        THEN EXCLUDED.event_ms ELSE l.event_ms END,
        event_seq = CASE WHEN (EXCLUDED.event_ms, EXCLUDED.event_seq) > (l.event_ms, l.event_seq)
                         THEN EXCLUDED.event_seq ELSE l.event_seq END;

    INSERT INTO reservation (id, tenant, user_id, channel, items, created_at, expires_at)
    SELECT b.id, b.tenant, b.user_id, b.channel, b.items, to_timestamp(b.created_at_ms / 1000.0),
           to_timestamp(NULLIF(b.expires_at_ms, 0) / 1000.0)
    FROM json_to_recordset(reservation_rows) AS b(id text, tenant text, user_id text, channel text,
                                                  items jsonb, created_at_ms bigint, expires_at_ms bigint)
    ON CONFLICT (id) DO NOTHING;

    IF progress_rows IS NOT NULL THEN
        INSERT INTO worker_progress AS p (shard, last_event_id, last_event_ms, last_event_seq, events_persisted)
        SELECT b.shard, b.last_event_id, b.last_event_ms, b.last_event_seq,
               COALESCE((new_per_shard ->> b.shard::text)::bigint, 0)
        FROM json_to_recordset(progress_rows) AS b(shard int, last_event_id text, last_event_ms bigint,
                                                   last_event_seq bigint)
        ON CONFLICT (shard) DO UPDATE SET
            last_event_id = CASE WHEN (EXCLUDED.last_event_ms, EXCLUDED.last_event_seq)
                                      > (p.last_event_ms, p.last_event_seq)
                                 THEN EXCLUDED.last_event_id ELSE p.last_event_id END,
            last_event_ms = CASE WHEN (EXCLUDED.last_event_ms, EXCLUDED.last_event_seq)
                                      > (p.last_event_ms, p.last_event_seq)
                                 THEN EXCLUDED.last_event_ms ELSE p.last_event_ms END,
            last_event_seq = CASE WHEN (EXCLUDED.last_event_ms, EXCLUDED.last_event_seq)
                                       > (p.last_event_ms, p.last_event_seq)
                                  THEN EXCLUDED.last_event_seq ELSE p.last_event_seq END,
            events_persisted = p.events_persisted + EXCLUDED.events_persisted,
            updated_at = now();
    END IF;

    RETURN new_rows;
END
$fn$;
