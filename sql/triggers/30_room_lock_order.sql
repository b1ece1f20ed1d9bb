-- Room lock order (README, "Deadlocks"; bench/deadlocks.py measures it).
--
-- Every captured change takes its room's counter row in change_sequences (10_change_capture.sql)
-- and holds that row lock until commit. A transaction that writes to several rooms takes their
-- counters in whatever order its rows come, so two of them can each hold a room the other
-- waits for: PostgreSQL aborts one with SQLSTATE 40P01 (deadlock_detected) after
-- deadlock_timeout. Taking every counter a transaction will need first, all in one fixed order
-- (room_id, byte order), makes such a cycle impossible between transactions that do so.
--
-- pgbridge_lock_rooms(rooms): takes the counters of `rooms` in that order (NULLs and repeats
-- ignored), creating missing ones with last_seq 0, so the room's first event still gets seq 1;
-- the locks are held until the transaction ends. Called by the trigger below, and by
-- applications (granted to the application role by setup_db.py --grant-app) at the start of a
-- transaction that writes to several rooms, once, with all of them (a room the transaction has
-- already written to, or locks in a second call, is taken out of order), a bulk move for instance:
--
--     BEGIN;
--     SELECT pgbridge_lock_rooms(ARRAY['<room A>', '<room B>']);
--     UPDATE messages SET channel_id = '<room B>' WHERE channel_id = '<room A>';
--     COMMIT;
--
-- It writes no event and takes no seq: seqs stay 1, 2, 3, ... per room in commit order. One
-- statement: INSERT ... ON CONFLICT DO UPDATE ... WHERE false locks an existing row without
-- writing a new version of it (a counter another transaction is creating is waited for, then
-- locked), and rows are inserted or locked in the order the sorted SELECT yields them.
-- PL/pgSQL rather than SQL so that the statement's plan is cached for the session (a SQL
-- function called from the trigger below would be planned again on every deletion).
CREATE OR REPLACE FUNCTION pgbridge_lock_rooms(p_rooms text[]) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO change_sequences AS s (room_id, last_seq)
    SELECT d.room, 0
    FROM (SELECT DISTINCT r COLLATE "C" AS room FROM unnest(p_rooms) AS r
          WHERE r IS NOT NULL) AS d
    ORDER BY d.room
    ON CONFLICT (room_id) DO UPDATE SET last_seq = s.last_seq WHERE false;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_lock_rooms(text[]) FROM PUBLIC;

-- A user's hard delete cascades (ON DELETE CASCADE, run after the users row is gone) into
-- their memberships and their reactions and reads on messages of any room, one captured event
-- per row, written once the whole cascade is done, in the order its rows were found: so two
-- users sharing rooms, deleted at the same time, would often deadlock. This BEFORE trigger
-- takes every room the cascade will write to first, in the fixed order. It runs after the
-- users row is locked, so no new membership, reaction or read of the user can appear in
-- between (inserting one locks the users row).
-- A user's messages are not looked at: messages.user_id is ON DELETE RESTRICT, so a user with
-- messages cannot be hard-deleted (should it ever cascade, add the rooms of their messages).
--
-- Not covered: several users deleted by one statement (each row's rooms are taken in order,
-- but one row after another: call pgbridge_lock_rooms with all their rooms first, or delete
-- one user per statement), and a message moved to another room by a concurrent transaction
-- between this trigger and the cascade (its reactions and reads then go to a room taken late).
-- Nor can any order help a transaction that holds one of the user's rows (an update of their
-- membership, reaction or read) and then waits for its room, while the deletion holds the room
-- and waits for the row: that deadlock exists without this trigger too.
CREATE OR REPLACE FUNCTION pgbridge_lock_user_rooms() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_rooms text[] := ARRAY(
        SELECT cm.channel_id FROM channel_members cm WHERE cm.user_id = OLD.id
        UNION
        SELECT m.channel_id FROM reactions r JOIN messages m ON m.id = r.message_id
        WHERE r.user_id = OLD.id
        UNION
        SELECT m.channel_id FROM message_reads mr JOIN messages m ON m.id = mr.message_id
        WHERE mr.user_id = OLD.id);
BEGIN
    -- one room: nothing to order (the deletion never holds one room while waiting for another)
    IF cardinality(v_rooms) > 1 THEN
        PERFORM pgbridge_lock_rooms(v_rooms);
    END IF;
    RETURN OLD;
END
$$;
REVOKE ALL ON FUNCTION pgbridge_lock_user_rooms() FROM PUBLIC;

CREATE OR REPLACE TRIGGER users_lock_rooms
    BEFORE DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION pgbridge_lock_user_rooms();
