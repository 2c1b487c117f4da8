-- A SKU's purchase policy (app/stock/policy.py): max_per_order, eligibility minimums and the hoarding
-- cooldown, as one JSON object of the flat integer fields the sku_set event carries (0 = rule off). One
-- column rather than seven: the rules are read and written together, and later rules need no migration.
--
-- persist_event_batch() keeps its signature; the 0003 body is kept under another name and called first,
-- so its statements and their lock order stay exactly as they were. The policy then follows the
-- settings: a batch's sku_set applies only if the row's settings now come from that very event, so an
-- older event, replayed or out of order, never overwrites a newer policy.

ALTER TABLE sku ADD COLUMN policy jsonb NOT NULL DEFAULT '{}'::jsonb;

ALTER FUNCTION persist_event_batch(json, json, json, json, json) RENAME TO persist_event_batch_0003;

CREATE FUNCTION persist_event_batch(
    movement_rows json, sku_rows json, line_rows json, reservation_rows json, progress_rows json
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    new_rows bigint;
BEGIN
    new_rows := persist_event_batch_0003(movement_rows, sku_rows, line_rows, reservation_rows, progress_rows);

    UPDATE sku AS s SET policy = b.policy
    FROM json_to_recordset(sku_rows) AS b(tenant text, sku text, policy jsonb, settings_event_ms bigint,
                                          settings_event_seq bigint)
    WHERE b.policy IS NOT NULL AND s.tenant = b.tenant AND s.sku = b.sku
      AND (s.settings_event_ms, s.settings_event_seq) = (b.settings_event_ms, b.settings_event_seq);

    RETURN new_rows;
END
$fn$;
