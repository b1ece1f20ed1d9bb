-- Access hints: a user who is deleted (hard), soft-deleted (deleted_at set) or whose id changes
-- loses every room at once, and the daemon must close that user's connections. users rows hold
-- personal data and are never published, so this rings the capture triggers' channel with a
-- hint that carries only the users.id (which every message event already carries):
--
--     {"access": "user", "user": "<users.id>"}
--
-- A hint is not trusted (any role may NOTIFY): the daemon reads users to decide, and checks
-- every connected user after each listener reconnect and every PGBRIDGE_ACCESS_CHECK_INTERVAL
-- seconds, so a change that bypasses this trigger is still found (README, "Authorization").
-- NOTIFY is delivered at commit in the order sent, so a hint precedes every event written
-- after it, in its own transaction or a later one.
CREATE OR REPLACE FUNCTION pgbridge_user_gone() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify(CASE WHEN TG_TABLE_SCHEMA = 'public' THEN 'pgbridge'
                           ELSE 'pgbridge_' || TG_TABLE_SCHEMA END,
                      json_build_object('access', 'user', 'user', OLD.id)::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER users_access_update
    AFTER UPDATE OF deleted_at, id ON users
    FOR EACH ROW
    WHEN (NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL OR NEW.id IS DISTINCT FROM OLD.id)
    EXECUTE FUNCTION pgbridge_user_gone();
CREATE OR REPLACE TRIGGER users_access_delete
    AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION pgbridge_user_gone();
