-- Presence: who is connected, kept true in user_status (spec 003) by the bridge instances, and
-- the channel typing signals travel on (DESIGN.md, "Presence and ephemeral signals"; README,
-- "Presence and typing").
--
-- Who owns what in user_status:
--   * the bridge owns the words 'online' and 'offline' of `status`, and `last_seen` (when the
--     user last came online or, once offline, when their last connection closed);
--   * the application owns `custom_status` and every other `status` ('away', 'busy'): the bridge
--     never overwrites them. To end its own status the application writes 'online' or 'offline'
--     (either): the trigger below stores whichever is true of the user's connections now.
--
-- A user is online while some presence_sessions row names them (sql/schema.sql). Each instance
-- writes only transitions of its own users, in batches (daemon/presence_writer.py):
-- pgbridge_presence_sync adds a row at a user's first connection to the instance and deletes it
-- once the last one has been closed for PGBRIDGE_PRESENCE_GRACE seconds, and renews the
-- instance's lease. pgbridge_presence_reap, called by every instance, deletes the rows of
-- instances whose lease ran out (SIGKILL, lost host) and turns their users offline.
--
-- Transitions of one user are serialized by a lock on the user's user_status row, taken first,
-- so two instances (or an instance and the reaper) never both conclude that they changed the
-- user's state, and every batch takes those locks in user_id byte order, so two batches never
-- deadlock. Every write of user_status that changes what a watcher sees (status, last_seen,
-- custom_status) sends a signed hint on the capture triggers' channel,
--
--     {"presence": "user", "user": "<users.id>"}
--
-- and every instance then reads the user's row and sends `presence` frames to its watchers of
-- the user's rooms (daemon/presence_feed.py). A hint only says "read this user again": it carries
-- nothing the daemon would believe. These functions run as the owner (SECURITY DEFINER, pinned
-- search_path) for the reasons given in 10_change_capture.sql; the bridge role may call the
-- three entry points (setup_db.py --grant-bridge), nobody else may call any of them.

-- The channel of typing signals (ephemeral, never stored), relayed between instances by the
-- instances themselves and signed with a key derived from change_notify_key (daemon/signing.py),
-- is the schema's secret 'typing' channel (pgbridge_channels, 10_change_capture.sql, "Secret
-- channels"). The one of before, '<capture channel>.typing', was named after the schema.
DROP FUNCTION IF EXISTS pgbridge_typing_channel(text);

-- One user's connection to one instance begins (p_join) or ends (its grace passed, or the
-- instance is reaped). Locks the user's status row first (creating it for a user who has none),
-- then changes the session row, then writes user_status when the user went from no session to
-- one or back: 'online'/'offline' replace each other, any other status stays; last_seen is now()
-- when the user comes online, p_last_seen when they go offline. Returns true on a transition.
-- A user id with no users row (deleted meanwhile) gets no status row; its session row still goes.
CREATE OR REPLACE FUNCTION pgbridge_presence_set(
    p_instance text, p_user text, p_join boolean, p_last_seen timestamptz
) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_before boolean;
    v_after boolean;
BEGIN
    PERFORM 1 FROM user_status WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        -- a concurrent creator makes this wait for its commit; either way the row is then there
        INSERT INTO user_status (user_id) SELECT p_user WHERE EXISTS (
            SELECT 1 FROM users WHERE id = p_user)
        ON CONFLICT (user_id) DO NOTHING;
        PERFORM 1 FROM user_status WHERE user_id = p_user FOR UPDATE;
    END IF;
    -- Each statement below sees what other transactions committed before this one got the lock
    -- (READ COMMITTED, a VOLATILE function: a new snapshot per statement).
    v_before := EXISTS (SELECT 1 FROM presence_sessions WHERE user_id = p_user);
    IF p_join THEN
        INSERT INTO presence_sessions (instance_id, user_id) VALUES (p_instance, p_user)
        ON CONFLICT (instance_id, user_id) DO UPDATE SET closed_at = NULL;
        v_after := true;
    ELSE
        DELETE FROM presence_sessions WHERE instance_id = p_instance AND user_id = p_user;
        v_after := EXISTS (SELECT 1 FROM presence_sessions WHERE user_id = p_user);
    END IF;
    IF v_before = v_after THEN
        RETURN false;
    END IF;
    UPDATE user_status
    SET status = CASE WHEN status IN ('online', 'offline')
                      THEN CASE WHEN v_after THEN 'online' ELSE 'offline' END
                      ELSE status END,
        last_seen = CASE WHEN v_after THEN now() ELSE least(p_last_seen, now()) END
    WHERE user_id = p_user;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_presence_set(text, text, boolean, timestamptz) FROM PUBLIC;

-- One batch of an instance (daemon/presence_writer.py): renew its lease for p_lease seconds (with
-- p_renew; a batch between two renewals only takes a key-share lock on the lease row, so that no
-- reaper deletes it meanwhile, and writes it not) and apply its transitions. p_users: distinct
-- users.id; p_closed_ago[i]: NULL for a first
-- connection, else how many seconds ago the user's last connection to this instance closed
-- (the grace period has passed). lease_held is false when the instance had no lease row: its
-- first call, or its lease ran out and another instance reaped it (its users went offline; the
-- caller must call again with every user it holds). changed: transitions written.
CREATE OR REPLACE FUNCTION pgbridge_presence_sync(
    p_instance text, p_lease double precision, p_renew boolean, p_users text[],
    p_closed_ago double precision[], OUT lease_held boolean, OUT changed integer
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v record;
BEGIN
    IF p_renew THEN
        UPDATE presence_instances
        SET heartbeat_at = now(), expires_at = now() + make_interval(secs => p_lease)
        WHERE instance_id = p_instance;
    ELSE
        PERFORM 1 FROM presence_instances WHERE instance_id = p_instance FOR KEY SHARE;
    END IF;
    lease_held := FOUND;
    IF NOT lease_held THEN
        INSERT INTO presence_instances (instance_id, expires_at)
        VALUES (p_instance, now() + make_interval(secs => p_lease));
    END IF;
    changed := 0;
    FOR v IN SELECT u.user_id, u.ago
             FROM unnest(p_users, p_closed_ago) AS u(user_id, ago)
             WHERE u.user_id IS NOT NULL
             ORDER BY u.user_id COLLATE "C" LOOP
        IF pgbridge_presence_set(p_instance, v.user_id, v.ago IS NULL,
                                 now() - make_interval(secs => coalesce(v.ago, 0))) THEN
            changed := changed + 1;
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_presence_sync(text, double precision, boolean, text[],
                                              double precision[]) FROM PUBLIC;

-- Delete every instance whose lease ran out, with its sessions; users left with no session go
-- offline with last_seen = when their connection closed if the instance recorded it at shutdown,
-- else the instance's last heartbeat. Instances another caller is reaping are skipped. Users are
-- taken in one sorted pass over all reaped instances (the lock order of every batch).
CREATE OR REPLACE FUNCTION pgbridge_presence_reap(OUT instances integer, OUT offline integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_dead text[];
    v record;
BEGIN
    SELECT coalesce(array_agg(i.instance_id), '{}') INTO v_dead FROM (
        SELECT instance_id FROM presence_instances WHERE expires_at < now()
        ORDER BY instance_id COLLATE "C" FOR UPDATE SKIP LOCKED) AS i;
    instances := cardinality(v_dead);
    offline := 0;
    IF instances = 0 THEN
        RETURN;
    END IF;
    FOR v IN SELECT s.instance_id, s.user_id, coalesce(s.closed_at, i.heartbeat_at) AS seen
             FROM presence_sessions s JOIN presence_instances i USING (instance_id)
             WHERE s.instance_id = ANY(v_dead)
             ORDER BY s.user_id COLLATE "C", s.instance_id LOOP
        IF pgbridge_presence_set(v.instance_id, v.user_id, false, v.seen) THEN
            offline := offline + 1;
        END IF;
    END LOOP;
    DELETE FROM presence_instances WHERE instance_id = ANY(v_dead);
END
$$;
REVOKE ALL ON FUNCTION pgbridge_presence_reap() FROM PUBLIC;

-- A clean shutdown: the instance's users are not turned offline at once (they are reconnecting
-- to another instance, usually): its lease is cut to p_grace seconds, after which any instance
-- reaps it, and p_users (whose last connection closed p_closed_ago[i] seconds ago) get that
-- moment recorded as their last_seen should they go offline then.
CREATE OR REPLACE FUNCTION pgbridge_presence_retire(
    p_instance text, p_grace double precision, p_users text[], p_closed_ago double precision[]
) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE presence_sessions s SET closed_at = now() - make_interval(secs => u.ago)
    FROM unnest(p_users, p_closed_ago) AS u(user_id, ago)
    WHERE s.instance_id = p_instance AND s.user_id = u.user_id;
    UPDATE presence_instances
    SET heartbeat_at = now(), expires_at = now() + make_interval(secs => p_grace)
    WHERE instance_id = p_instance;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_presence_retire(text, double precision, text[],
                                                double precision[]) FROM PUBLIC;

-- What the bridge owns in a user_status row is written by the presence functions only (README,
-- "Presence and typing"). A writer that may not run them (the application role: every role but
-- the owner and superusers, who may also drop these triggers) may write status and
-- custom_status (status through pgbridge_status_truth below), and nothing else:
--   * INSERT: last_seen is now(), the spec's default, whatever the row says;
--   * UPDATE: last_seen is kept; user_id may not change (a row moved from a connected user to a
--     user who never connected made that user look online, issue 25 (7), and left the
--     connected one without a row, looking offline): refused, SQLSTATE 42501;
--   * DELETE of the row of a user who exists: the row stays, with what the application wrote
--     cleared (custom_status; a status word of its own becomes the truth), so that no
--     connected user looks offline and no DELETE then INSERT resets last_seen; the DELETE
--     reports it did not delete the row. A row of a deleted user goes (ON DELETE CASCADE runs
--     as the owner anyway).
-- SECURITY INVOKER on purpose, unlike every other function here: the rule is about who writes,
-- and a definer function sees only its owner. It reads no table the writer could not read
-- (users, through its own UPDATE of user_status), and its search_path is pinned all the same.
CREATE OR REPLACE FUNCTION pgbridge_status_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path FROM CURRENT AS $$
BEGIN
    IF has_function_privilege('pgbridge_presence_set(text, text, boolean, timestamptz)',
                              'EXECUTE') THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM users WHERE id = OLD.user_id) THEN
            RETURN OLD;
        END IF;
        UPDATE user_status SET custom_status = NULL, status = 'offline'
        WHERE user_id = OLD.user_id;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.user_id IS DISTINCT FROM OLD.user_id THEN
            RAISE EXCEPTION 'user_status.user_id cannot change: insert a row for the other user'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'user_status describes the user it was created for '
                             '(README, "Presence and typing")';
        END IF;
        NEW.last_seen := OLD.last_seen;
    ELSE
        NEW.last_seen := now();
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_status_guard() FROM PUBLIC;

-- BEFORE triggers run in name order: the guard, then the truth.
CREATE OR REPLACE TRIGGER user_status_guard
    BEFORE INSERT OR UPDATE OR DELETE ON user_status
    FOR EACH ROW EXECUTE FUNCTION pgbridge_status_guard();

-- Whoever writes 'online' or 'offline' into status (the application ending its 'away', say)
-- gets what is true of the user's connections; other words are stored as written. Every INSERT
-- and every UPDATE, whatever columns it sets: an UPDATE of custom_status alone, or of user_id
-- by the owner, stores the truth of the row's user too.
CREATE OR REPLACE FUNCTION pgbridge_status_truth() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.status IN ('online', 'offline') THEN
        NEW.status := CASE WHEN EXISTS (SELECT 1 FROM presence_sessions
                                        WHERE user_id = NEW.user_id)
                           THEN 'online' ELSE 'offline' END;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_status_truth() FROM PUBLIC;

CREATE OR REPLACE TRIGGER user_status_truth
    BEFORE INSERT OR UPDATE ON user_status
    FOR EACH ROW EXECUTE FUNCTION pgbridge_status_truth();

-- The presence hint (see the top of this file), signed like every payload of the channel.
-- NOTIFY sends one of identical payloads of a transaction, so a batch that creates a user's row
-- and then turns it online rings once for that user.
CREATE OR REPLACE FUNCTION pgbridge_presence_hint() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_hint text;
    v_user text;
BEGIN
    FOREACH v_user IN ARRAY ARRAY[CASE WHEN TG_OP <> 'DELETE' THEN NEW.user_id END,
                                  CASE WHEN TG_OP <> 'INSERT' THEN OLD.user_id END] LOOP
        CONTINUE WHEN v_user IS NULL;
        v_hint := json_build_object('presence', 'user', 'user', v_user)::text;
        PERFORM pg_notify(pgbridge_channel(k.ipad, k.opad, 'capture', TG_TABLE_SCHEMA),
                          pgbridge_hmac(k.ipad, k.opad, v_hint) || v_hint)
        FROM change_notify_key k;
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_presence_hint() FROM PUBLIC;

CREATE OR REPLACE TRIGGER user_status_hint
    AFTER INSERT OR DELETE ON user_status
    FOR EACH ROW EXECUTE FUNCTION pgbridge_presence_hint();
CREATE OR REPLACE TRIGGER user_status_hint_update
    AFTER UPDATE ON user_status
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.last_seen IS DISTINCT FROM NEW.last_seen
          OR OLD.custom_status IS DISTINCT FROM NEW.custom_status
          OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION pgbridge_presence_hint();
