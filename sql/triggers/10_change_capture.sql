-- Change capture: every row change of a published table becomes one change_events row with the
-- room's next seq, written in the writer's own transaction, and, while the bridges want a
-- doorbell, one signed NOTIFY.
--
-- NOTIFY channel: a secret one, pgbridge_channel(...'capture'...) below. Any role may LISTEN on
-- any channel it can name, with no privilege check, so no channel the triggers ring may be
-- guessable by a role that may not read the key (see "Secret channels" below).
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

-- Secret channels (README, "Database roles and what the daemon trusts"). LISTEN takes no
-- privilege: a role that may not SELECT messages heard every message row on the old channels,
-- 'pgbridge' and 'pgbridge.typing', named after the schema. Every channel of a schema is now
--
--     'pgbridge_' || the first 40 hex digits of HMAC-SHA256(change_notify_key.key,
--                                                 'pgbridge channel:<purpose>:<schema>')
--
-- for the purposes 'capture' (events, access and presence hints, the doorbell's notice, the
-- bridge's probe) and 'typing' (signals relayed between instances). Function source is public
-- (pg_proc.prosrc) but the key is not, so only the owner and the bridge role can name them: 160
-- bits nobody else can guess. Each schema has its own random key, and the schema's name is in
-- the label too, so a --test schema or a schema restored from a dump of another (same key)
-- never rings another schema's bridges. A rotated key (DELETE its row, run setup_db.py) gives
-- new channels; the daemon reads the key every 5 s and LISTENs again on a new connection.
--
-- Who may name them: the owner (pgbridge_channels), the bridge role through pgbridge_listen,
-- which LISTENs on both from inside the function (so the names appear in no query text that
-- pg_stat_activity or pg_stat_statements keep) and returns them to the caller. Nobody else may
-- EXECUTE either, nor pgbridge_channel (setup_db.py --verify refuses a schema where PUBLIC may).

-- The channels of before: named after the schema and callable by anyone.
DROP FUNCTION IF EXISTS pgbridge_listen_channel(text);

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

-- A schema's channel for p_purpose ('capture' or 'typing'), given the key's pads: see "Secret
-- channels" above. 49 bytes, within NOTIFY's 63. Inlined into its callers like pgbridge_hmac.
CREATE OR REPLACE FUNCTION pgbridge_channel(p_ipad bytea, p_opad bytea, p_purpose text,
                                            p_schema text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT 'pgbridge_' || left(pgbridge_hmac(p_ipad, p_opad,
                                             'pgbridge channel:' || p_purpose || ':' || p_schema),
                               40)
$$;
REVOKE ALL ON FUNCTION pgbridge_channel(bytea, bytea, text, text) FROM PUBLIC;

-- The schema's two channels, for the owner's tools (setup_db.py --verify, tests). Run as the
-- caller: only the owner may EXECUTE it, and only a role that can read the key could.
CREATE OR REPLACE FUNCTION pgbridge_channels(OUT capture text, OUT typing text)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT pgbridge_channel(k.ipad, k.opad, 'capture', current_schema()),
           pgbridge_channel(k.ipad, k.opad, 'typing', current_schema())
    FROM change_notify_key k
$$;
REVOKE ALL ON FUNCTION pgbridge_channels() FROM PUBLIC;

-- The bridge's LISTEN (setup_db.py --grant-bridge may EXECUTE it; nobody else): LISTEN on both
-- channels in the caller's session (LISTEN takes effect at the commit of the calling
-- transaction) and return their names, which appear in no statement's text. Raises SQLSTATE
-- 55000 when the key is missing (run setup_db.py).
CREATE OR REPLACE FUNCTION pgbridge_listen(OUT capture text, OUT typing text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    SELECT c.capture, c.typing INTO capture, typing FROM pgbridge_channels() c;
    IF capture IS NULL THEN
        RAISE EXCEPTION 'pgbridge: %.change_notify_key holds no key', current_schema()
            USING ERRCODE = '55000', HINT = 'Run setup_db.py as the schema owner.';
    END IF;
    EXECUTE format('LISTEN %I', capture);
    EXECUTE format('LISTEN %I', typing);
END
$$;
REVOKE ALL ON FUNCTION pgbridge_listen() FROM PUBLIC;

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
    v_channel text;
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
    -- the write receipt (pgbridge_receipt, below): this transaction's events as they are
    -- recorded in the transaction-local setting pgbridge.receipt, and their prefix
    receipt_max CONSTANT int := 8192;  -- bytes: about 90 events of messages
    v_tag text;
    v_receipt text;
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
        IF v_tag IS NULL THEN
            v_tag := pg_current_xact_id()::text || ':';
            v_receipt := current_setting('pgbridge.receipt', true);
            -- another transaction's value, or anything the session SET: start afresh
            IF v_receipt IS NULL OR NOT starts_with(v_receipt, v_tag)
               OR octet_length(v_receipt) > receipt_max THEN
                v_receipt := v_tag;
            END IF;
        END IF;
        IF v_receipt <> v_tag || '!' THEN
            v_receipt := v_receipt || json_build_array(e_room, v_seq, TG_TABLE_NAME, e_op, e_id)
                                      || ',';
            IF octet_length(v_receipt) > receipt_max THEN
                v_receipt := v_tag || '!';  -- past the cap: the receipt says it is incomplete
            END IF;
        END IF;
        CONTINUE WHEN NOT v_ring;
        IF v_ipad IS NULL THEN
            SELECT k.ipad, k.opad, pgbridge_channel(k.ipad, k.opad, 'capture', TG_TABLE_SCHEMA)
            INTO v_ipad, v_opad, v_channel FROM change_notify_key k;
        END IF;
        v_frame := pgbridge_event_frame(e_room, v_seq, TG_TABLE_NAME, e_op, e_id, e_data, v_ts);
        IF octet_length(v_frame) > notify_max THEN
            v_frame := json_build_object('room', e_room, 'seq', v_seq)::text;
        END IF;
        PERFORM pg_notify(v_channel, pgbridge_hmac(v_ipad, v_opad, v_frame) || v_frame);
    END LOOP;
    IF v_tag IS NOT NULL THEN
        PERFORM set_config('pgbridge.receipt', v_receipt, true);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_capture() FROM PUBLIC;

-- The write receipt (docs/howto/optimistic-send.md): the events the calling transaction has
-- produced so far, (room_id, seq, table_name, op, row_id) in capture order, none when it has
-- produced none. Called in the writer's transaction (INSERT ...; SELECT * FROM
-- pgbridge_receipt();), it gives the seq each event will carry when the bridges deliver it.
--
-- Where it comes from: pgbridge_capture appends each event it writes, as a JSON array and a
-- comma, to the transaction-local setting pgbridge.receipt (set_config(..., true)), prefixed with
-- the top-level transaction id ('<xid>:'; pg_current_xact_id() is the same in a subtransaction
-- and never reused). Chosen over a transaction-id column on change_events read through a
-- SECURITY DEFINER function (docs/design.md, "The write receipt"), measured
-- (docs/benchmarks/write-overhead.md): no index on the hottest table, no migration, and the
-- setting is the session's own, so no function can read another transaction's events.
-- * Savepoints: a setting changed in a subtransaction is restored by its rollback, so the events
--   of a rolled-back savepoint leave the receipt with their rows; a released one keeps them.
-- * The value ends with the transaction (SET LOCAL semantics); a value left by the session (SET
--   pgbridge.receipt = ..., ALTER ROLE ... SET) lacks this transaction's id and is ignored
--   (unless the session predicted its next transaction id and wrote it in: transaction ids are
--   sequential), and the trigger only ever appends to a value with the current id: what the
--   session sets can neither fail the trigger nor reach another session. A session can fool
--   only itself (SET inside its own transaction, a value tagged with its next transaction id,
--   or a function of its own with a SET pgbridge.receipt clause, whose end restores the
--   value): the receipt is the writer's own account, not an authority.
-- * The cap: each append copies the value several times (read, concatenation, set_config and
--   the save of the previous value at each trigger call), so its cost grows with the receipt:
--   measured 2.6 to 3.4 us for a transaction's first event, 4 to 8 us per event on average up to
--   8 KiB, 70 us up to 64 KiB (docs/benchmarks/write-overhead.md, "The write receipt"). Past 8 KiB
--   (receipt_max in pgbridge_capture: about 90 events of messages) the trigger replaces the
--   value with '<xid>:!' and records no more (a few us per event, as a first one); this
--   function then raises SQLSTATE 54000 (program_limit_exceeded). The writes are not affected.
-- VOLATILE: the triggers of a statement change it. SECURITY INVOKER: it reads only the caller's
-- own setting. The application role may EXECUTE it (setup_db.py --grant-app), PUBLIC may not.
CREATE OR REPLACE FUNCTION pgbridge_receipt()
RETURNS TABLE (room_id text, seq bigint, table_name text, op text, row_id text)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    v_xid xid8 := pg_current_xact_id_if_assigned();
    v_receipt text := current_setting('pgbridge.receipt', true);
    v_tag text := v_xid::text || ':';
    v_events jsonb;
BEGIN
    -- no transaction id yet: this transaction has written nothing, so captured nothing
    IF v_xid IS NULL OR v_receipt IS NULL OR NOT starts_with(v_receipt, v_tag) THEN
        RETURN;
    END IF;
    v_receipt := substr(v_receipt, length(v_tag) + 1);
    IF v_receipt = '!' THEN
        RAISE EXCEPTION 'pgbridge: this transaction produced more events than the receipt holds '
                        '(8 KiB, about 90 events)'
            USING ERRCODE = '54000',
                  HINT = 'Read the seqs of a bulk transaction from the delivered events instead.';
    END IF;
    BEGIN
        v_events := ('[' || rtrim(v_receipt, ',') || ']')::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'pgbridge: the receipt of this transaction was overwritten by the session'
            USING ERRCODE = '22023',
                  HINT = 'Do not SET pgbridge.receipt: pgbridge''s capture trigger writes it.';
    END;
    RETURN QUERY
        SELECT e->>0, (e->>1)::bigint, e->>2, e->>3, e->>4
        FROM jsonb_array_elements(v_events) WITH ORDINALITY AS t (e, n)
        ORDER BY t.n;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_receipt() FROM PUBLIC;

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
-- the (secret) capture channel, unsigned: a hint that makes every bridge call this function
-- with 0 to learn the truth, so a forged one costs a read and changes nothing. 0 only reads.
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
            PERFORM pg_notify(pgbridge_channel(k.ipad, k.opad, 'capture', current_schema()),
                              '{"doorbell":"quiet"}')
            FROM change_notify_key k;
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
