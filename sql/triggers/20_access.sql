-- Access hints: a user who is deleted (hard), soft-deleted (deleted_at set) or whose id changes
-- loses every room at once, and the daemon must close that user's connections. users rows hold
-- personal data and are never published, so this rings the capture triggers' (secret) channel
-- with a hint that carries only the users.id (which every message event already carries):
--
--     {"access": "user", "user": "<users.id>"}
--
-- signed like the capture triggers' payloads (10_change_capture.sql), and run as the owner for
-- the same reasons. Even signed, a hint is only a hint: the daemon reads users to decide, checks
-- every connected user after each listener reconnect and every PGBRIDGE_ACCESS_CHECK_INTERVAL
-- seconds, so a change that bypasses this trigger is still found (README, "Authorization").
-- NOTIFY is delivered at commit in the order sent, so a hint precedes every event written
-- after it, in its own transaction or a later one.
CREATE OR REPLACE FUNCTION pgbridge_user_gone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_hint text := json_build_object('access', 'user', 'user', OLD.id)::text;
BEGIN
    PERFORM pg_notify(pgbridge_channel(k.ipad, k.opad, 'capture', TG_TABLE_SCHEMA),
                      pgbridge_hmac(k.ipad, k.opad, v_hint) || v_hint)
    FROM change_notify_key k;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_user_gone() FROM PUBLIC;

CREATE OR REPLACE TRIGGER users_access_update
    AFTER UPDATE OF deleted_at, id ON users
    FOR EACH ROW
    WHEN (NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL OR NEW.id IS DISTINCT FROM OLD.id)
    EXECUTE FUNCTION pgbridge_user_gone();
CREATE OR REPLACE TRIGGER users_access_delete
    AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION pgbridge_user_gone();

-- Membership hints: a user's feed (PROTOCOL.md, "One feed per user"; daemon/feed.py) follows
-- every room of the user, and learns of a room the user joins from this hint, sent when a
-- channel_members row is inserted or given to another user or room, and for every member of a
-- room restored after a soft delete (its deleted_at set back to null):
--
--     {"access": "member", "user": "<users.id>"}
--
-- signed and sent as the access hint above, always: also while the doorbell's lease keeps the
-- capture triggers quiet (memberships change seldom; a NOTIFY per membership write is what
-- following a join within milliseconds costs). A hint only: the daemon reads channel_members,
-- and reads every feed's memberships again after each listener reconnect.
CREATE OR REPLACE FUNCTION pgbridge_member_joined() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_TABLE_NAME = 'channels' THEN  -- restored: each member's feeds read their rooms again
        PERFORM pg_notify(pgbridge_channel(k.ipad, k.opad, 'capture', TG_TABLE_SCHEMA),
                          pgbridge_hmac(k.ipad, k.opad, h.hint) || h.hint)
        FROM change_notify_key k,
             (SELECT json_build_object('access', 'member', 'user', m.user_id)::text AS hint
              FROM channel_members m WHERE m.channel_id = NEW.id) AS h;
    ELSE
        PERFORM pg_notify(pgbridge_channel(k.ipad, k.opad, 'capture', TG_TABLE_SCHEMA),
                          pgbridge_hmac(k.ipad, k.opad, h.hint) || h.hint)
        FROM change_notify_key k,
             (SELECT json_build_object('access', 'member', 'user', NEW.user_id)::text) AS h(hint);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_member_joined() FROM PUBLIC;

CREATE OR REPLACE TRIGGER channel_members_joined
    AFTER INSERT ON channel_members
    FOR EACH ROW EXECUTE FUNCTION pgbridge_member_joined();
CREATE OR REPLACE TRIGGER channel_members_moved
    AFTER UPDATE OF channel_id, user_id ON channel_members
    FOR EACH ROW
    WHEN (NEW.channel_id IS DISTINCT FROM OLD.channel_id OR NEW.user_id IS DISTINCT FROM OLD.user_id)
    EXECUTE FUNCTION pgbridge_member_joined();
CREATE OR REPLACE TRIGGER channels_restored
    AFTER UPDATE OF deleted_at ON channels
    FOR EACH ROW WHEN (OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL)
    EXECUTE FUNCTION pgbridge_member_joined();
