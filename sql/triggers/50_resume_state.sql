-- Resume state is the bridge's (DESIGN.md, "Trust boundaries", "sync_state"; README, "Database
-- roles and what the daemon trusts"). A client that subscribes without `since` resumes from its
-- user's sync_state row of the room (sync_type 'events', written by the daemon's batched acks,
-- daemon/store.py), so whoever writes that row decides which events the client never gets.
--
-- The application keeps the spec's sync_state (spec 003: id, user_id, last_sync, sync_type,
-- metadata) for rows of its own. It may not write the resume columns room_id and last_seq
-- (column privileges, setup_db.py --grant-app: daemon/roles.py), and this trigger guards the
-- rows the bridge resumes from as a whole, since a resume row the application could DELETE, or
-- move to another user or sync_type, would make the bridge resume its user from the head (a
-- silent gap) or from another user's cursor: a row that has a room_id or a last_seq, before or
-- after the write, is inserted, changed or deleted only by a role that may both UPDATE
-- sync_state(last_seq) and read the log (change_events): the bridge and the owner. A role
-- granted by an older setup_db.py (UPDATE on the whole table) reads no log, so it is refused
-- here before it is granted again. Refusals are SQLSTATE 42501. ON DELETE CASCADE from users and
-- channels runs as the table's owner, so it goes through.
--
-- SECURITY INVOKER on purpose, unlike the capture functions: the rule is about who writes, and
-- a definer function sees only its owner. It reads no table; its search_path is pinned all the
-- same, so a temporary change_events names nothing.
CREATE OR REPLACE FUNCTION pgbridge_resume_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path FROM CURRENT AS $$
BEGIN
    IF (TG_OP <> 'INSERT' AND (OLD.room_id IS NOT NULL OR OLD.last_seq IS NOT NULL))
       OR (TG_OP <> 'DELETE' AND (NEW.room_id IS NOT NULL OR NEW.last_seq IS NOT NULL)) THEN
        IF NOT (has_column_privilege(TG_RELID, 'last_seq', 'UPDATE')
                AND has_table_privilege('change_events', 'SELECT')) THEN
            RAISE EXCEPTION 'sync_state rows with a room_id or last_seq are the bridge''s: % '
                            'may not % them', current_user, lower(TG_OP)
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'the bridge resumes clients from them (README, "Database roles '
                             'and what the daemon trusts")';
        END IF;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_resume_guard() FROM PUBLIC;

CREATE OR REPLACE TRIGGER sync_state_resume_guard
    BEFORE INSERT OR UPDATE OR DELETE ON sync_state
    FOR EACH ROW EXECUTE FUNCTION pgbridge_resume_guard();
