-- Access hints: a user who is deleted (hard), soft-deleted (deleted_at set) or whose id changes
-- loses every room at once, and the daemon must close that user's connections. users rows hold
-- personal data and are never published, so this rings the capture triggers' channel with a
-- hint that carries only the users.id (which every message event already carries):
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
    PERFORM pg_notify(pgbridge_listen_channel(TG_TABLE_SCHEMA),
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
