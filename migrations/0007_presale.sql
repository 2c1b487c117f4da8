-- Presale / backorder (app/stock/presale.py): a SKU's presale settings and its units promised on
-- backorder, and each reservation line's backordered units, so that a rebuild restores them and
-- reconcile compares them.
--
-- Events carry `bo` (the SKU's backordered units after the change) and, about a line, `lbo` (the line's
-- backordered units after it); sku_set carries the presale's flat fields. As 0004 did, persist_event_batch()
-- keeps its signature and calls the previous body first, so its statements and lock order stay as they
-- were; then each projection takes the new values only from the very event its row now reflects (the
-- newest, compared by stream position), so an older event, replayed or out of order, never overwrites them.
-- These UPDATEs touch only rows the call above just wrote, already locked by this transaction.

ALTER TABLE sku
    ADD COLUMN backordered bigint NOT NULL DEFAULT 0 CHECK (backordered >= 0),
    ADD COLUMN presale     jsonb;  -- {presale_cap, presale_eta, presale_ends_at} (ms), NULL: no presale

COMMENT ON COLUMN sku.backordered IS 'units held or sold on backorder after the newest persisted event (Redis is the live counter)';

ALTER TABLE reservation_line
    ADD COLUMN backordered bigint NOT NULL DEFAULT 0 CHECK (backordered >= 0);

ALTER FUNCTION persist_event_batch(json, json, json, json, json) RENAME TO persist_event_batch_0004;

CREATE FUNCTION persist_event_batch(
    movement_rows json, sku_rows json, line_rows json, reservation_rows json, progress_rows json
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    new_rows bigint;
BEGIN
    new_rows := persist_event_batch_0004(movement_rows, sku_rows, line_rows, reservation_rows, progress_rows);

    UPDATE sku AS s SET backordered = b.backordered
    FROM json_to_recordset(sku_rows) AS b(tenant text, sku text, backordered bigint, event_ms bigint,
                                          event_seq bigint)
    WHERE b.backordered IS NOT NULL AND s.tenant = b.tenant AND s.sku = b.sku
      AND (s.event_ms, s.event_seq) = (b.event_ms, b.event_seq);

    UPDATE sku AS s SET presale = b.presale
    FROM json_to_recordset(sku_rows) AS b(tenant text, sku text, presale jsonb, settings_event_ms bigint,
                                          settings_event_seq bigint)
    WHERE b.settings_event_ms IS NOT NULL AND s.tenant = b.tenant AND s.sku = b.sku
      AND (s.settings_event_ms, s.settings_event_seq) = (b.settings_event_ms, b.settings_event_seq);

    UPDATE reservation_line AS l SET backordered = b.backordered
    FROM json_to_recordset(line_rows) AS b(reservation_id text, sku text, backordered bigint, event_ms bigint,
                                           event_seq bigint)
    WHERE b.backordered IS NOT NULL AND l.reservation_id = b.reservation_id AND l.sku = b.sku
      AND (l.event_ms, l.event_seq) = (b.event_ms, b.event_seq);

    RETURN new_rows;
END
$fn$;
