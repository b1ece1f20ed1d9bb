-- Down script of 0002_sync_state_resume.sql (setup_db.py --rollback, spec 003 "Rollback Plan"):
-- sync_state goes back to the spec's columns. Its rows stay, acks the bridge wrote included
-- (they are chat rows); only the resume columns room_id and last_seq go, with the CHECK, the
-- foreign key and the unique index 0002 added. Never CASCADE: an object of the user's built on
-- them (a view, a foreign key to the unique index) makes the DROP fail with SQLSTATE 2BP01, and
-- the rollback then names it and changes nothing.
--
-- Run with search_path set to the schema rolled back, inside the rollback's transaction.

DO $$
DECLARE
    v_room text := (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                    WHERE a.attrelid = to_regclass('sync_state') AND a.attname = 'room_id'
                      AND a.attnum > 0 AND NOT a.attisdropped);
    v_seq text := (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                   WHERE a.attrelid = to_regclass('sync_state') AND a.attname = 'last_seq'
                     AND a.attnum > 0 AND NOT a.attisdropped);
    v_mine text;
BEGIN
    -- Both gone: nothing of 0002 is left to undo (rolled back by hand, or never applied).
    IF v_room IS NULL AND v_seq IS NULL THEN
        RETURN;
    END IF;
    -- Anything else this script does not expect was changed by hand: refuse, naming it.
    IF v_room IS DISTINCT FROM 'character varying(26)' THEN
        RAISE EXCEPTION 'pgbridge: %.sync_state.room_id is %, not the character varying(26) '
                        'migration 0002 added: it was changed by hand', current_schema(),
                        coalesce(v_room, 'missing')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'restore it or drop both room_id and last_seq by hand, then run '
                         'setup_db.py --rollback again';
    END IF;
    IF v_seq IS DISTINCT FROM 'bigint' THEN
        RAISE EXCEPTION 'pgbridge: %.sync_state.last_seq is %, not the bigint migration 0002 '
                        'added: it was changed by hand', current_schema(),
                        coalesce(v_seq, 'missing')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'restore it or drop both room_id and last_seq by hand, then run '
                         'setup_db.py --rollback again';
    END IF;
    -- 0002 adds room_id with its foreign key, then last_seq: a room_id without that key, or a
    -- last_seq older than room_id, was found there by the apply (ADD COLUMN IF NOT EXISTS
    -- skipped it): the user's, with the user's data, never dropped here.
    IF NOT EXISTS (SELECT 1 FROM pg_constraint c JOIN pg_attribute a
                   ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                   WHERE c.conrelid = to_regclass('sync_state') AND c.contype = 'f'
                     AND c.conname = 'sync_state_room_id_fkey' AND a.attname = 'room_id')
       OR (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass('sync_state')
           AND attname = 'last_seq') < (SELECT attnum FROM pg_attribute
           WHERE attrelid = to_regclass('sync_state') AND attname = 'room_id') THEN
        RAISE EXCEPTION 'pgbridge: %.sync_state.room_id and last_seq are not both the columns '
                        'migration 0002 added (room_id lacks its foreign key '
                        'sync_state_room_id_fkey, or last_seq was there first): one is yours '
                        'or was changed by hand', current_schema()
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'rename a column of yours, or drop pgbridge''s by hand, then run '
                         'setup_db.py --rollback again';
    END IF;
    -- DROP COLUMN takes the table's indexes and constraints on the column with it, RESTRICT
    -- or not: one of the user's (anything but 0002's and pgbridge's triggers) is named instead,
    -- as PostgreSQL names a view built on the column.
    SELECT string_agg(format('%s depends on column %s of table sync_state',
                             pg_describe_object(d.classid, d.objid, 0), a.attname), '; '
                      ORDER BY 1)
      INTO v_mine
      FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
     WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = to_regclass('sync_state')
       AND a.attname IN ('room_id', 'last_seq') AND d.deptype = 'a'
       AND NOT (d.classid = 'pg_class'::regclass
                AND d.objid = to_regclass('sync_state_user_room_type_key'))
       AND NOT (d.classid = 'pg_constraint'::regclass AND d.objid IN (
                SELECT oid FROM pg_constraint WHERE conrelid = to_regclass('sync_state')
                AND conname IN ('sync_state_last_seq_check', 'sync_state_room_id_fkey')))
       AND NOT (d.classid = 'pg_trigger'::regclass AND d.objid IN (
                SELECT t.oid FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                WHERE t.tgrelid = to_regclass('sync_state') AND p.proname LIKE 'pgbridge\_%'));
    IF v_mine IS NOT NULL THEN
        RAISE EXCEPTION 'cannot drop columns room_id and last_seq of table %.sync_state because '
                        'other objects depend on them', current_schema()
            USING ERRCODE = 'dependent_objects_still_exist', DETAIL = v_mine;
    END IF;
END
$$;

DROP INDEX IF EXISTS sync_state_user_room_type_key RESTRICT;
ALTER TABLE IF EXISTS sync_state DROP CONSTRAINT IF EXISTS sync_state_last_seq_check RESTRICT;
ALTER TABLE IF EXISTS sync_state DROP CONSTRAINT IF EXISTS sync_state_room_id_fkey RESTRICT;
ALTER TABLE IF EXISTS sync_state DROP COLUMN IF EXISTS last_seq RESTRICT;
ALTER TABLE IF EXISTS sync_state DROP COLUMN IF EXISTS room_id RESTRICT;
