-- Change capture: every row change of a published table becomes one change_events row with the
-- room's next seq, written in the writer's own transaction, and one NOTIFY (the doorbell).
--
-- NOTIFY channel: 'pgbridge' for the public schema, 'pgbridge_<schema>' for any other (so a
-- --test schema in the same database never rings the production daemon). Payload: the whole
-- protocol `event` frame when it fits in NOTIFY_MAX bytes, else {"room": ..., "seq": ...} and the
-- daemon reads the event from change_events. NOTIFY is delivered at commit, in commit order; a
-- rolled-back transaction notifies nothing and gives its seq back.
--
-- The functions run with the search_path they were created with (SET search_path FROM CURRENT),
-- so they work in whichever schema setup_db.py applied them to.

-- The protocol's `event` frame (PROTOCOL.md), as text. Used for NOTIFY payloads and by the
-- daemon when it replays from the log, so both paths produce the same bytes.
CREATE OR REPLACE FUNCTION pgbridge_event_frame(
    p_room text, p_seq bigint, p_table text, p_op text, p_id text, p_data jsonb, p_ts timestamptz
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT json_build_object(
        'type', 'event', 'room', p_room, 'seq', p_seq, 'table', p_table, 'op', p_op,
        'id', p_id, 'data', p_data,
        'ts', to_char(p_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
    )::text
$$;

-- The row trigger. TG_ARGV[0] says how to find the row's room:
--   'self'       the row is the room (channels)
--   'channel_id' the row's channel_id column (messages, channel_members)
--   'message_id' the channel of the row's message (reactions, files, message_reads); a row
--                without a message, or one removed by the cascade of its message's deletion,
--                has no room left and is not published (the message's DELETE announces it).
-- The event's id is the row's id, or 'a:b' for the two-column keys of channel_members
-- (channel_id:user_id) and message_reads (message_id:user_id). An UPDATE that moves a row to
-- another room or changes its id is published as DELETE (old row, old id) in the old room and
-- UPDATE in the new one: a membership given to another user (channel_members.user_id changed)
-- ends the old user's access exactly as a DELETE of the row does.
--
-- Everything is inline in one function (one search_path switch, no nested calls): this runs in
-- every writer's transaction, and bench/write_overhead.py measures what it costs them.
CREATE OR REPLACE FUNCTION pgbridge_capture() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    notify_max CONSTANT int := 7000;  -- NOTIFY payloads must stay under 8000 bytes
    v_how text := TG_ARGV[0];
    v_channel text := CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'pgbridge'
                           ELSE 'pgbridge_' || TG_TABLE_SCHEMA END;
    v_row jsonb;
    v_old jsonb;
    -- the column that, with user_id, keys a two-column table; NULL: the key is id
    v_key text := CASE TG_TABLE_NAME WHEN 'channel_members' THEN 'channel_id'
                                     WHEN 'message_reads' THEN 'message_id' END;
    v_room text;
    v_old_room text;
    v_id text;
    v_old_id text;
    v_seq bigint;
    v_ts timestamptz;
    v_frame text;
    -- what to emit: the old room first (moved rows only), then the row's room
    v_rooms text[];
    v_ops text[];
    v_ids text[];
    v_datas jsonb[];
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_row := to_jsonb(OLD);
    ELSE
        v_row := to_jsonb(NEW);
    END IF;
    IF v_how = 'self' THEN
        v_room := v_row->>'id';
    ELSIF v_how = 'channel_id' THEN
        v_room := v_row->>'channel_id';
    ELSE
        SELECT m.channel_id INTO v_room FROM messages m WHERE m.id = v_row->>'message_id';
    END IF;
    v_id := CASE WHEN v_key IS NULL THEN v_row->>'id'
                 ELSE concat(v_row->>v_key, ':', v_row->>'user_id') END;
    v_rooms := ARRAY[v_room];
    v_ops := ARRAY[TG_OP];
    v_ids := ARRAY[v_id];
    v_datas := ARRAY[v_row];

    IF TG_OP = 'UPDATE' THEN
        v_old := to_jsonb(OLD);
        v_old_id := CASE WHEN v_key IS NULL THEN v_old->>'id'
                         ELSE concat(v_old->>v_key, ':', v_old->>'user_id') END;
        IF v_how = 'self' THEN
            v_old_room := v_old_id;
        ELSIF v_old->>v_how IS NOT DISTINCT FROM v_row->>v_how THEN
            v_old_room := v_room;
        ELSIF v_how = 'channel_id' THEN
            v_old_room := v_old->>'channel_id';
        ELSE
            SELECT m.channel_id INTO v_old_room FROM messages m WHERE m.id = v_old->>'message_id';
        END IF;
        IF v_old_room IS DISTINCT FROM v_room OR v_old_id IS DISTINCT FROM v_id THEN
            v_rooms := ARRAY[v_old_room, v_room];
            v_ops := ARRAY['DELETE', TG_OP];
            v_ids := ARRAY[v_old_id, v_id];
            v_datas := ARRAY[v_old, v_row];
        END IF;
    END IF;

    FOR i IN 1..array_length(v_rooms, 1) LOOP
        CONTINUE WHEN v_rooms[i] IS NULL;
        v_ts := clock_timestamp();
        -- The room's next seq; the row lock it takes is held until commit.
        WITH bumped AS (
            INSERT INTO change_sequences AS s (room_id, last_seq) VALUES (v_rooms[i], 1)
            ON CONFLICT (room_id) DO UPDATE SET last_seq = s.last_seq + 1
            RETURNING s.last_seq
        )
        INSERT INTO change_events (room_id, seq, table_name, op, row_id, payload, created_at)
        SELECT v_rooms[i], bumped.last_seq, TG_TABLE_NAME, v_ops[i], v_ids[i], v_datas[i], v_ts
        FROM bumped
        RETURNING seq INTO v_seq;
        v_frame := pgbridge_event_frame(v_rooms[i], v_seq, TG_TABLE_NAME, v_ops[i], v_ids[i],
                                        v_datas[i], v_ts);
        IF octet_length(v_frame) > notify_max THEN
            v_frame := json_build_object('room', v_rooms[i], 'seq', v_seq)::text;
        END IF;
        PERFORM pg_notify(v_channel, v_frame);
    END LOOP;
    RETURN NULL;
END
$$;

-- Published tables. users, user_settings, user_status and sync_state are never published: they
-- hold personal data and belong to no room.
CREATE OR REPLACE TRIGGER channels_capture
    AFTER INSERT OR UPDATE OR DELETE ON channels
    FOR EACH ROW EXECUTE FUNCTION pgbridge_capture('self');
CREATE OR REPLACE TRIGGER messages_capture
    AFTER INSERT OR UPDATE OR DELETE ON messages
    FOR EACH ROW EXECUTE FUNCTION pgbridge_capture('channel_id');
CREATE OR REPLACE TRIGGER channel_members_capture
    AFTER INSERT OR UPDATE OR DELETE ON channel_members
    FOR EACH ROW EXECUTE FUNCTION pgbridge_capture('channel_id');
CREATE OR REPLACE TRIGGER reactions_capture
    AFTER INSERT OR UPDATE OR DELETE ON reactions
    FOR EACH ROW EXECUTE FUNCTION pgbridge_capture('message_id');
CREATE OR REPLACE TRIGGER files_capture
    AFTER INSERT OR UPDATE OR DELETE ON files
    FOR EACH ROW EXECUTE FUNCTION pgbridge_capture('message_id');
CREATE OR REPLACE TRIGGER message_reads_capture
    AFTER INSERT OR UPDATE OR DELETE ON message_reads
    FOR EACH ROW EXECUTE FUNCTION pgbridge_capture('message_id');
