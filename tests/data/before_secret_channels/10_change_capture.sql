-- Change capture: every row change of a published table becomes one change_events row with the
-- room's next seq, written in the writer's own transaction, and, while the bridges want a
-- doorbell, one signed NOTIFY.
--
-- NOTIFY channel: pgbridge_listen_channel(schema), below (the daemon asks the database for it).
-- Payload: the HMAC-SHA256 of a JSON text, as 64 lower-case hex digits, followed by that text:
-- the whole protocol `event` frame when it fits in NOTIFY_MAX bytes, else {"room": ..., "seq":
-- ...} and the daemon reads the event from change_events. Any role may NOTIFY any channel; the
-- key (change_notify_key) is readable only by the owner and the bridge, so the daemon acts on
-- nothing it cannot verify (daemon/signing.py). NOTIFY is delivered at commit, in commit order;
-- a rolled-back transaction notifies nothing and gives its seq back.
--
-- The adaptive doorbell (README, "The adaptive doorbell"): every transaction that NOTIFYs takes
-- one lock of the whole server at commit and holds it through the commit's WAL flush, so under
-- load capturing writers commit one at a time. While the lease in change_doorbell (schema.sql)
-- runs, the trigger writes the log and nothing else: no NOTIFY, no frame, no signature, and the
-- bridges read the log on a short interval instead (pgbridge_doorbell, below).
--
-- Trust (DESIGN.md, "Trust boundaries"): the trigger functions run as their owner (SECURITY
-- DEFINER), the role that ran setup_db.py and owns the log, so writers need no privilege on
-- change_events, change_sequences or the key, and cannot forge or rewrite the log. Their
-- search_path is pinned at creation (SET search_path FROM CURRENT; daemon/schema.py applies these
-- files with search_path "<schema>", pg_temp): tables resolve in the target schema, a temporary
-- table of any name is looked at last, and pg_temp is never searched for functions. Nobody but
-- the owner may EXECUTE them, so nobody else can attach them to a table of their own.

-- The NOTIFY channel of a schema's triggers, the one place it is derived (the daemon asks the
-- database for it): 'pgbridge' for public, 'pgbridge_<schema>' for any other (so a --test schema
-- in the same database never rings the production daemon), and for a schema name too long for
-- that to fit in a channel name (63 bytes), 'pgbridge_' and 40 hex digits of its SHA-256.
CREATE OR REPLACE FUNCTION pgbridge_listen_channel(p_schema text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_schema = 'public' THEN 'pgbridge'
                WHEN octet_length(p_schema) <= 54 THEN 'pgbridge_' || p_schema
                ELSE 'pgbridge_' || left(encode(sha256(convert_to(p_schema, 'UTF8')), 'hex'), 40)
           END
$$;

-- HMAC-SHA256 of p_text (its UTF-8 bytes) as hex, given the key's precomputed pads
-- (change_notify_key.ipad/opad): H(opad || H(ipad || text)).
--
-- These two are STABLE, not IMMUTABLE, because convert_to() is STABLE: the planner inlines a
-- SQL function only when its body is no more volatile than it is declared, and a call that is
-- not inlined costs twice as much (measured here: 4.2 against 2.0 us per call). Signing costs
-- the capture trigger about 10 us per row (bench/write_overhead.py --profile, "unsigned").
CREATE OR REPLACE FUNCTION pgbridge_hmac(p_ipad bytea, p_opad bytea, p_text text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT encode(sha256(p_opad || sha256(p_ipad || convert_to(p_text, 'UTF8'))), 'hex')
$$;

-- The protocol's `event` frame (PROTOCOL.md), as text. Used for NOTIFY payloads and by the
-- daemon when it replays from the log, so both paths produce the same bytes. Pure and touching
-- no table, it is left SECURITY INVOKER so that the planner inlines it into both callers.
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
-- Everything is inline in one function (one search_path switch; the helpers above are inlined):
-- this runs in every writer's transaction, and bench/write_overhead.py measures what it costs.
CREATE OR REPLACE FUNCTION pgbridge_capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    notify_max CONSTANT int := 7000;  -- NOTIFY payloads (64 hex + JSON) must stay under 8000 bytes
    v_how text := TG_ARGV[0];
    v_ring boolean;
    v_ipad bytea;
    v_opad bytea;
    v_row jsonb;
    v_old jsonb;
    -- the column that, with user_id, keys a two-column table; NULL: the key is id
    v_key text := CASE TG_TABLE_NAME WHEN 'channel_members' THEN 'channel_id'
                                     WHEN 'message_reads' THEN 'message_id' END;
    v_room text;
    v_old_room text;
    v_id text;
    v_old_id text;
    v_moved boolean := false;
    -- the event being written: a moved row's DELETE in its old room first, then the row's own
    e_room text;
    e_op text;
    e_id text;
    e_data jsonb;
    v_seq bigint;
    v_ts timestamptz;
    v_frame text;
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
        v_moved := v_old_room IS DISTINCT FROM v_room OR v_old_id IS DISTINCT FROM v_id;
    END IF;

    -- Ring unless the bridges hold the doorbell lease. This transaction's xid was assigned when
    -- its row was written, before this read: pgbridge_doorbell's barrier relies on it.
    v_ring := clock_timestamp() >= to_timestamp((SELECT d.last_value FROM change_doorbell d)
                                                / 1000.0);
    -- Scalars rather than arrays of the events: 2 us less per row (bench/write_overhead.py).
    FOR i IN (CASE WHEN v_moved THEN 1 ELSE 2 END)..2 LOOP
        IF i = 1 THEN
            e_room := v_old_room; e_op := 'DELETE'; e_id := v_old_id; e_data := v_old;
        ELSE
            e_room := v_room; e_op := TG_OP; e_id := v_id; e_data := v_row;
        END IF;
        CONTINUE WHEN e_room IS NULL;
        v_ts := clock_timestamp();
        -- The room's next seq; the row lock it takes is held until commit. A plain UPDATE
        -- costs the writer less than INSERT ... ON CONFLICT (bench/write_overhead.py
        -- --profile); a room's first event creates its counter, then takes the same path.
        FOR attempt IN 1..2 LOOP
            WITH bumped AS (
                UPDATE change_sequences s SET last_seq = s.last_seq + 1
                WHERE s.room_id = e_room
                RETURNING s.last_seq
            )
            INSERT INTO change_events (room_id, seq, table_name, op, row_id, payload, created_at)
            SELECT e_room, bumped.last_seq, TG_TABLE_NAME, e_op, e_id, e_data, v_ts
            FROM bumped
            RETURNING seq INTO v_seq;
            EXIT WHEN FOUND;
            -- A concurrent first event of the room is waited for; its counter is then used.
            INSERT INTO change_sequences (room_id, last_seq) VALUES (e_room, 0)
            ON CONFLICT (room_id) DO NOTHING;
        END LOOP;
        IF v_seq IS NULL THEN
            RAISE EXCEPTION 'pgbridge: could not take the next seq of room %', e_room
                USING ERRCODE = '40001', HINT = 'Retry the transaction.';
        END IF;
        CONTINUE WHEN NOT v_ring;
        IF v_ipad IS NULL THEN
            SELECT k.ipad, k.opad INTO v_ipad, v_opad FROM change_notify_key k;
        END IF;
        v_frame := pgbridge_event_frame(e_room, v_seq, TG_TABLE_NAME, e_op, e_id, e_data, v_ts);
        IF octet_length(v_frame) > notify_max THEN
            v_frame := json_build_object('room', e_room, 'seq', v_seq)::text;
        END IF;
        PERFORM pg_notify(pgbridge_listen_channel(TG_TABLE_SCHEMA),
                          pgbridge_hmac(v_ipad, v_opad, v_frame) || v_frame);
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_capture() FROM PUBLIC;

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

-- The bridges' side of the doorbell (daemon/doorbell.py decides, daemon/listener.py calls).
--
-- p_quiet_ms > 0 (at most 60000) asks writers to stop ringing for that long: the lease becomes
-- now + p_quiet_ms unless it already runs longer (several bridges share it: writers ring again
-- only once none of them renews it). Turning it on from off also sends {"doorbell":"quiet"} on
-- the capture channel, unsigned: a hint that makes every bridge call this function with 0 to
-- learn the truth, so a forged one costs a read and changes nothing. 0 only reads.
--
-- Returns the lease (quiet_until; NULL when writers ring), the server's clock (now), the count
-- of change_events inserts from the statistics system (captured; NULL when track_counts is
-- off), and with p_new_barrier, when the lease is over, a barrier: every transaction that may
-- have read the lease while it ran and not rung. A writer reads the lease after its xid was
-- assigned (its row is written before an AFTER trigger runs), and one that read it running read
-- the clock before this call did; so they all have an xid below the one this call takes after
-- reading the clock, and each is either in the snapshot's list of running xids or at or above
-- its xmax (the oldest xid not yet completed). The barrier is that set, as a pg_snapshot whose
-- xip lists it. settled (given p_barrier) is true once none of them is in progress: until
-- then a bridge keeps reading the log. Taking the xid costs a commit record, once per switch.
--
-- Two bridges renewing at the same instant may leave the shorter of their two leases: harmless,
-- each reads the lease back on every call. Writers compare it with clock_timestamp(): the lease
-- assumes the server's clock does not step back by more than a renewal interval.
CREATE OR REPLACE FUNCTION pgbridge_doorbell(
    p_quiet_ms integer, p_new_barrier boolean DEFAULT false, p_barrier pg_snapshot DEFAULT NULL,
    OUT quiet_until timestamptz, OUT now timestamptz, OUT captured bigint,
    OUT barrier pg_snapshot, OUT settled boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_until bigint := (SELECT d.last_value FROM change_doorbell d);
    v_now_ms bigint;
    v_xid bigint;
    v_snap pg_snapshot;
BEGIN
    now := clock_timestamp();
    v_now_ms := floor(extract(epoch FROM now) * 1000)::bigint;
    IF p_quiet_ms > 0 THEN
        IF v_until <= v_now_ms THEN
            PERFORM pg_notify(pgbridge_listen_channel(current_schema()), '{"doorbell":"quiet"}');
        END IF;
        v_until := greatest(v_until, v_now_ms + least(p_quiet_ms, 60000));
        PERFORM setval('change_doorbell', v_until);
    END IF;
    quiet_until := CASE WHEN v_until > v_now_ms THEN to_timestamp(v_until / 1000.0) END;
    captured := CASE WHEN current_setting('track_counts')::boolean
                     THEN pg_stat_get_tuples_inserted('change_events'::regclass) END;
    IF p_new_barrier AND quiet_until IS NULL THEN
        v_xid := pg_current_xact_id()::text::bigint;
        v_snap := pg_current_snapshot();
        barrier := format('%s:%s:%s', pg_snapshot_xmin(v_snap), v_xid, (
            SELECT string_agg(x::text, ',' ORDER BY x) FROM (
                SELECT x::text::bigint FROM pg_snapshot_xip(v_snap) AS s(x)
                UNION
                SELECT generate_series(pg_snapshot_xmax(v_snap)::text::bigint, v_xid - 1)
            ) AS r(x) WHERE x < v_xid))::pg_snapshot;
    END IF;
    IF p_barrier IS NOT NULL THEN
        settled := NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(p_barrier) AS x(xid)
                               WHERE pg_xact_status(x.xid) = 'in progress');
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_doorbell(integer, boolean, pg_snapshot) FROM PUBLIC;
