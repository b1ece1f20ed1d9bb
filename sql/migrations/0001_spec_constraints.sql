-- Bring tables created from the bare spec (spec 003 DDL: foreign keys without ON DELETE rules,
-- no CHECKs, no key defaults) up to sql/schema.sql. On a database created by schema.sql every
-- step finds its constraint already in place and does nothing.

DO $$
DECLARE
    fk record;
    existing record;
BEGIN
    FOR fk IN
        SELECT * FROM (VALUES
            ('messages', 'channel_id', 'channels', 'CASCADE', 'c'),
            ('messages', 'user_id', 'users', 'RESTRICT', 'r'),
            ('channel_members', 'channel_id', 'channels', 'CASCADE', 'c'),
            ('channel_members', 'user_id', 'users', 'CASCADE', 'c'),
            ('user_settings', 'user_id', 'users', 'CASCADE', 'c'),
            ('user_status', 'user_id', 'users', 'CASCADE', 'c'),
            ('sync_state', 'user_id', 'users', 'CASCADE', 'c'),
            ('reactions', 'message_id', 'messages', 'CASCADE', 'c'),
            ('reactions', 'user_id', 'users', 'CASCADE', 'c'),
            ('files', 'message_id', 'messages', 'CASCADE', 'c'),
            ('message_reads', 'message_id', 'messages', 'CASCADE', 'c'),
            ('message_reads', 'user_id', 'users', 'CASCADE', 'c')
        ) AS t(tbl, col, ref, action, code)
    LOOP
        SELECT c.conname, c.confdeltype INTO existing
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.conrelid = to_regclass(quote_ident(fk.tbl)) AND c.contype = 'f'
          AND array_length(c.conkey, 1) = 1 AND a.attname = fk.col;
        IF FOUND AND existing.confdeltype = fk.code
                 AND existing.conname = fk.tbl || '_' || fk.col || '_fkey' THEN
            CONTINUE;
        END IF;
        IF FOUND THEN
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', fk.tbl, existing.conname);
        END IF;
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I FOREIGN KEY (%I) REFERENCES %I(id) ON DELETE %s',
                       fk.tbl, fk.tbl || '_' || fk.col || '_fkey', fk.col, fk.ref, fk.action);
    END LOOP;
END
$$;

-- CHECKs for the enum-like columns. Added NOT VALID (enforced for every new or updated row at
-- once) and then validated; rows that already break a rule are left as they are, with a notice,
-- rather than failing the upgrade.
DO $$
DECLARE
    ck record;
BEGIN
    FOR ck IN
        SELECT * FROM (VALUES
            ('channel_members', 'channel_members_role_check',
             $c$CHECK (role IN ('owner', 'admin', 'member', 'guest'))$c$),
            ('user_settings', 'user_settings_theme_check',
             $c$CHECK (theme IN ('light', 'dark', 'system'))$c$),
            ('user_status', 'user_status_status_check',
             $c$CHECK (status IN ('online', 'away', 'busy', 'offline'))$c$),
            ('sync_state', 'sync_state_sync_type_check',
             $c$CHECK (sync_type IN ('full', 'incremental', 'events'))$c$),
            ('files', 'files_size_check', $c$CHECK (size >= 0)$c$)
        ) AS t(tbl, name, def)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = to_regclass(quote_ident(ck.tbl)) AND conname = ck.name) THEN
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s NOT VALID', ck.tbl, ck.name, ck.def);
            BEGIN
                EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', ck.tbl, ck.name);
            EXCEPTION WHEN check_violation THEN
                RAISE NOTICE 'pgbridge: existing rows of % break %; kept NOT VALID', ck.tbl, ck.name;
            END;
        END IF;
    END LOOP;
END
$$;

-- ULID defaults for plain-SQL inserts.
ALTER TABLE users ALTER COLUMN id SET DEFAULT gen_ulid();
ALTER TABLE channels ALTER COLUMN id SET DEFAULT gen_ulid();
ALTER TABLE messages ALTER COLUMN id SET DEFAULT gen_ulid();
ALTER TABLE reactions ALTER COLUMN id SET DEFAULT gen_ulid();
ALTER TABLE files ALTER COLUMN id SET DEFAULT gen_ulid();
ALTER TABLE sync_state ALTER COLUMN id SET DEFAULT gen_ulid();
